"""The agent's built-in tools: `calculator` (arithmetic, parsed, never evaluated as Python), `python` (the sandboxed
code interpreter, one stateful session per conversation) and `files` (list, read and write files in the
conversation's directory, which the interpreter shares)."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class ToolError(ValueError):
    """A tool could not do what was asked: the message becomes the observation."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    run: Callable[[dict], str]
    timeout_s: float = 30.0
    close: Callable[[], None] = field(default=lambda: None)

    def spec(self) -> dict:
        """The tool as an OpenAI function (what `react_instruction` and the chat template describe)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}  # fmt: skip


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {name: getattr(math, name) for name in ("sqrt", "exp", "log", "log10", "log2", "sin", "cos", "tan",
              "asin", "acos", "atan", "floor", "ceil", "factorial", "gcd")} | {"abs": abs, "round": round}  # fmt: skip
_CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate_arithmetic(expression: str) -> float | int:
    """Numbers, + - * / // % **, parentheses, a few functions of `math` and pi, e; nothing else (no names, no
    attributes, no calls but those), and no power or factorial large enough to stall the process."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ToolError("exponent too large (at most 1000)")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            args = [ev(a) for a in node.args]
            if node.func.id == "factorial" and args and args[0] > 1000:
                raise ToolError("factorial too large (at most 1000!)")
            return _FUNCTIONS[node.func.id](*args)
        raise ToolError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot read {expression!r} as arithmetic") from None
    try:
        return ev(tree)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
        raise ToolError(f"{type(e).__name__}: {e}") from None


def calculator() -> Tool:
    def run(args: dict) -> str:
        value = evaluate_arithmetic(str(args.get("expression", "")))
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            value = int(value)
        return str(value)

    return Tool(
        "calculator",
        "Evaluates an arithmetic expression (+ - * / // % **, parentheses, sqrt, log, sin, pi, ...).",
        {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3"}},
            "required": ["expression"],
        },  # fmt: skip
        run,
        timeout_s=5.0,
    )


def python(workdir: Path, timeout_s: float = 30.0) -> Tool:
    """The code interpreter, started on first use, in `workdir`."""
    from align.tools.interpreter import CodeInterpreter

    session: dict = {}

    def run(args: dict) -> str:
        code = args.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolError("'code' must be Python source")
        if "ci" not in session:
            session["ci"] = CodeInterpreter(workdir=workdir)
        result = session["ci"].execute(code, timeout_s=timeout_s)
        if result.status != "ok":  # the call failed (an exception, a timeout, a restart): the run records it so
            raise ToolError(result.observation())
        return result.observation()

    def close() -> None:
        if "ci" in session:
            session.pop("ci").close()

    return Tool(
        "python",
        "Runs Python code in a stateful session (variables persist between calls); files are in its working "
        "directory; plots drawn with matplotlib are saved as PNG files. Returns what the code prints and its result.",
        {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        run,
        timeout_s=timeout_s + 15.0,
        close=close,
    )


def files(workdir: Path, max_chars: int = 8000) -> Tool:
    root = Path(workdir).resolve()

    def inside(path: str) -> Path:
        target = (root / path).resolve()
        if target != root and root not in target.parents:
            raise ToolError(f"{path!r} is outside the working directory")
        return target

    def run(args: dict) -> str:
        op, path = args.get("op"), str(args.get("path", "."))
        if op == "list":
            target = inside(path)
            if not target.is_dir():
                raise ToolError(f"{path!r} is not a directory")
            names = sorted(
                str(p.relative_to(root)) for p in target.rglob("*") if p.is_file() and ".kernel" not in p.parts
            )
            return "\n".join(names) or "(empty)"
        if op == "read":
            target = inside(path)
            if not target.is_file():
                raise ToolError(f"no file {path!r}")
            text = target.read_text(encoding="utf-8", errors="replace")
            return text[:max_chars] + ("\n[truncated]" if len(text) > max_chars else "")
        if op == "write":
            content = args.get("content")
            if not isinstance(content, str):
                raise ToolError("'content' must be text")
            target = inside(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
            return f"wrote {len(content)} characters to {path}"
        raise ToolError("'op' must be list, read or write")

    return Tool(
        "files",
        "Lists, reads or writes text files in the working directory.",
        {
            "type": "object",
            "properties": {
                "op": {"type": "string", "enum": ["list", "read", "write"]},
                "path": {"type": "string"},
                "content": {"type": "string"},
            },
            "required": ["op"],
        },  # fmt: skip
        run,
        timeout_s=10.0,
    )


BUILTIN = ("calculator", "python", "files")


def builtin_tools(names: list[str], workdir: Path, python_timeout_s: float = 30.0) -> list[Tool]:
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        raise ValueError(f"unknown tools {unknown}; built in: {', '.join(BUILTIN)}")
    make = {"calculator": calculator, "python": lambda: python(workdir, python_timeout_s),
            "files": lambda: files(workdir)}  # fmt: skip
    return [make[n]() for n in names]
