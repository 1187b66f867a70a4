"""Qwen's ReAct format for tools: tool descriptions for the system turn, OpenAI-style tool calls as ReAct text.

The instruction is the one in Qwen's ReAct prompt (`examples/react_prompt.md`). A conversation with tools puts it
in the system turn, after the system message. An assistant message's `tool_calls` become `Action:` /
`Action Input:` lines after its content; each tool result that follows becomes `\\nObservation: {result}` in the
same assistant turn, and an assistant message after a tool result continues that turn on a new line. The chat
template saved with every checkpoint (`base_model.hf_tokenizer.CHAT_TEMPLATE`) produces the same text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from base_model.hf_tokenizer import REACT_INSTRUCTION, TOOL_DESC  # one text for render and the chat template

TOOL_ROLES = ("tool", "function")


class ToolFormatError(ValueError):
    pass


def tool_function(tool: object, where: str = "tool") -> dict:
    """An OpenAI tool (`{"type": "function", "function": {...}}`) or a bare function description → the function."""
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolFormatError(f"{where}: expected a function description with a 'name', got {tool!r:.80}")
    if not isinstance(function.get("description", ""), str):
        raise ToolFormatError(f"{where}: 'description' must be a string")
    return function


def react_instruction(tools: Sequence[object]) -> str:
    """The ReAct instruction listing `tools` (each with name, description and JSON-schema parameters)."""
    functions = [tool_function(t, f"tools[{i}]") for i, t in enumerate(tools)]
    descs = [
        TOOL_DESC.format(
            name=f["name"],
            description=f.get("description", ""),
            parameters=json.dumps(f.get("parameters", {}), ensure_ascii=False),
        )
        for f in functions
    ]
    return REACT_INSTRUCTION.format(tool_descs="\n\n".join(descs), tool_names=", ".join(f["name"] for f in functions))


def call_text(call: object, where: str = "tool_call") -> str:
    """One tool call (`{"function": {"name", "arguments"}}` or `{"name", "arguments"}`) as ReAct lines.

    Arguments given as a string are kept verbatim (OpenAI sends JSON text); any other value is written as JSON."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolFormatError(f"{where}: expected a call with a 'name', got {call!r:.80}")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f"Action: {function['name']}\nAction Input: {arguments}"


def assistant_text(message: dict, where: str = "message") -> str:
    """An assistant message's content followed by its tool calls, one `Action:` block per call."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ToolFormatError(f"{where}: 'tool_calls' must be a list")
    parts = [message["content"]] if message["content"] else []
    parts += [call_text(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ Qwen's text-completion ReAct prompt

# Qwen's `examples/react_prompt.md`, verbatim: the prompt a tool-using agent sends as one user turn.
REACT_TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} API "
    "useful for? {description_for_model} Parameters: {parameters} Format the arguments as a JSON object."
)
REACT_PROMPT = REACT_INSTRUCTION + "\n\nQuestion: {query}"


def qwen_plugin(tool: object, where: str = "tool") -> dict:
    """A tool in Qwen's plugin form (`name_for_model`, `name_for_human`, `description_for_model`, `parameters`),
    from that form or from an OpenAI function (name, description, JSON-schema parameters)."""
    if isinstance(tool, dict) and "name_for_model" in tool:
        return {"name_for_human": tool.get("name_for_human", tool["name_for_model"]), **tool}
    f = tool_function(tool, where)
    return {"name_for_model": f["name"], "name_for_human": f["name"], "description_for_model": f.get("description", ""),
            "parameters": f.get("parameters", {})}  # fmt: skip


def react_prompt(query: str, tools: Sequence[object]) -> str:
    """Qwen's ReAct prompt for `query` (its `react_prompt.md`, character for character): the tool descriptions,
    the format, and `Question: {query}`. The model continues it with `Thought:`/`Action:`/`Action Input:` and is
    stopped at `Observation:`; the caller appends `Observation: {result}` and asks again."""
    plugins = [qwen_plugin(t, f"tools[{i}]") for i, t in enumerate(tools)]
    descs = [
        REACT_TOOL_DESC.format(
            name_for_model=p["name_for_model"],
            name_for_human=p["name_for_human"],
            description_for_model=p["description_for_model"],
            parameters=json.dumps(p["parameters"], ensure_ascii=False),
        )
        for p in plugins
    ]
    names = ",".join(p["name_for_model"] for p in plugins)
    return REACT_PROMPT.format(tool_descs="\n\n".join(descs), tool_names=names, query=query)


# ------------------------------------------------------------------------------------------- reading model output

_LABEL = re.compile(r"^[ \t]*(thought|action input|action|final answer|observation)[ \t]*[:：][ \t]*", re.I | re.M)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


@dataclass
class ReActStep:
    """One parsed assistant step: a tool call (`action`, `arguments`), a `final_answer`, or an `error` to feed back
    to the model as its next observation (unknown tool, invalid JSON, missing arguments)."""

    thought: str = ""
    action: str | None = None
    arguments: dict | None = None
    final_answer: str | None = None
    error: str | None = None

    def tool_call(self, call_id: str = "call_0") -> dict:
        """The call in OpenAI's `tool_calls` form."""
        arguments = json.dumps(self.arguments or {}, ensure_ascii=False)
        return {"id": call_id, "type": "function", "function": {"name": self.action, "arguments": arguments}}

    def message(self) -> dict:
        """The step as an OpenAI assistant message: the thought (or final answer) as content, the call as
        `tool_calls`."""
        if self.action and not self.error:
            return {"role": "assistant", "content": self.thought or None, "tool_calls": [self.tool_call()]}
        return {"role": "assistant", "content": self.final_answer if self.final_answer is not None else self.thought}


_ACTION = re.compile(r"^[ \t]*action[ \t]*[:：]", re.I | re.M)


def text_before_action(text: str) -> str:
    """The step's text before its `Action:` line (its `Thought: …`, label included), as the model wrote it: the
    content of the assistant message that carries the call, so rendering the message gives the model's text back."""
    m = _ACTION.search(text)
    return (text[: m.start()] if m else text).rstrip()


def parse_react(text: str, tools: Sequence[object]) -> ReActStep:
    """Read a model's ReAct step. Tolerant of the usual deviations (label case and spacing, a full-width colon,
    the input on the next line or in a ```json fence, a quoted or back-ticked tool name, text the model wrote past
    its own `Observation:`); strict about what would run: an unknown tool, Action Input that is not a JSON object,
    or missing required arguments give `error` (fed back as the observation) instead of a call. Text with neither
    an action nor a final answer is the final answer."""
    functions = {f["name"]: f for f in (tool_function(t, f"tools[{i}]") for i, t in enumerate(tools))}
    fields: list[tuple[str, str]] = []
    marks = list(_LABEL.finditer(text))
    for i, m in enumerate(marks):
        label = m.group(1).lower()
        if label == "observation":  # the model went on past its stop: what follows is not its own
            break
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        fields.append((label, text[m.end() : end].strip()))
    if not marks:
        return ReActStep(final_answer=text.strip())
    first = {}
    for label, value in fields:
        first.setdefault(label, value)
    order = [label for label, _ in fields]
    thought = first.get("thought", text[: marks[0].start()].strip())
    if "final answer" in first and ("action" not in first or order.index("final answer") < order.index("action")):
        return ReActStep(thought=thought, final_answer=first["final answer"])
    if "action" not in first:
        return ReActStep(thought=thought, final_answer=thought)
    name = first["action"].strip().rstrip(".").strip().strip("`'\"").strip()
    step = ReActStep(thought=thought, action=name)
    if name not in functions:
        step.error = f"unknown tool {name!r}; the tools are: {', '.join(functions) or 'none'}"
        return step
    raw = first.get("action input", "").strip()
    if fence := _FENCE.match(raw):
        raw = fence.group(1).strip()
    try:
        arguments = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        step.error = f"Action Input for {name} is not valid JSON ({e.msg} at character {e.pos}): {raw[:200]}"
        return step
    if not isinstance(arguments, dict):
        step.error = f"Action Input for {name} must be a JSON object, got {type(arguments).__name__}"
        return step
    missing = [k for k in functions[name].get("parameters", {}).get("required", []) if k not in arguments]
    if missing:
        step.error = f"Action Input for {name} lacks the required argument(s): {', '.join(missing)}"
        return step
    step.arguments = arguments
    return step
