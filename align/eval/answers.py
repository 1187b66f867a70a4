"""Final answers of maths problems, read from model text and compared, and the unbiased pass@k estimator.

- GSM8K: a reference ends with `#### 72`; a model's answer is the number after `####`, after "the answer is", in
  the last `\\boxed{}`, or else the last number in its text (thousands separators, `$` and a trailing `.` dropped).
- MATH: the last `\\boxed{…}` (or `\\fbox{…}`), braces balanced. Two answers are equal when their normalised
  text is (spaces, `\\left`/`\\right`, `\\!`, `\\dfrac`/`\\tfrac`, `^\\circ`, `\\%`, `\\text{units}`, a leading `x =`),
  or when both read as numbers or sympy expressions and their difference simplifies to 0 (`\\frac{3}{4}` = 0.75 =
  `3/4`, `\\sqrt{8}` = `2\\sqrt{2}`).
- `exact_answer` is a reward function or judge for `ppo.extra_rewards` / `eval.judges`: 1 for a right final answer,
  0 otherwise (verifiable rewards).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def _plain_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").strip().rstrip(".")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` or `\\fbox{…}` (nested braces kept), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K reference or model answer, as plain text ("72", "0.2", "-3"), or None."""
    for pattern in (rf"####\s*\$?\s*({_NUMBER})", rf"answer is\s*:?\s*\$?\s*({_NUMBER})"):
        if found := re.findall(pattern, text, re.I):
            return _plain_number(found[-1])
    if (boxed := last_boxed(text)) is not None and re.fullmatch(rf"\$?\s*({_NUMBER})\s*", boxed):
        return _plain_number(boxed)
    numbers = re.findall(_NUMBER, text)
    return _plain_number(numbers[-1]) if numbers else None


def normalise_math(answer: str) -> str:
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s)  # trailing units
    s = re.sub(r"\\(?:text|textbf|mathrm)\{(.*?)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""),
                     ("\\$", "")):  # fmt: skip
        s = s.replace(old, new)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5"
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac34
    s = re.sub(r"^0\.", ".", s) if re.fullmatch(r"0\.\d+", s) else s
    return s.rstrip(".")


def _sympy(expr: str):
    """A sympy expression of a normalised answer (simple LaTeX: \\frac, \\sqrt, \\pi, ^, \\cdot), or None."""
    from tokenize import TokenError

    import sympy

    s = expr
    for _ in range(4):  # nested fractions and roots, inside out
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\[(\d+)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\sqrt(\d+)", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    # model text reaches sympy's parser (which evaluates Python): numbers, + - * / ** ( ), sqrt, pi and
    # one-letter variables only, short, with small exponents
    if len(s) > 120 or not re.fullmatch(r"(?:\d+\.?\d*|\.\d+|sqrt|pi|[a-zA-Z](?![a-zA-Z_])|[\s()*/+\-])*", s):
        return None
    if s.count("**") > 2 or re.search(r"\*\*\s*\(*\s*\d{3,}", s):
        return None
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        rationalize,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, rationalize)
    try:
        return parse_expr(s, transformations=transformations, evaluate=True)
    except (sympy.SympifyError, SyntaxError, TypeError, ValueError, TokenError):
        return None


def math_equal(a: str | None, b: str | None) -> bool:
    """Whether two final answers are the same (normalised text, numbers, or sympy difference 0)."""
    if a is None or b is None:
        return False
    na, nb = normalise_math(a), normalise_math(b)
    if na == nb:
        return True
    try:
        return math.isclose(float(_plain_number(na)), float(_plain_number(nb)), rel_tol=1e-6, abs_tol=1e-9)
    except ValueError:
        pass
    ea, eb = _sympy(na), _sympy(nb)
    if ea is None or eb is None:
        return False
    import sympy

    try:
        return bool(sympy.simplify(ea - eb) == 0)
    except (TypeError, ValueError, AttributeError):
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a problem with n samples of which c passed (Chen et al. 2021):
    1 − C(n−c, k) / C(n, k), as a stable product."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _prompt_key(prompt) -> str:
    if isinstance(prompt, list):
        users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    return " ".join(str(prompt).split())


def exact_answer(prompts: Sequence, responses: Sequence[str], answers: str, kind: str = "gsm8k") -> list[float]:
    """A verifiable reward: 1.0 when a response's final answer equals the reference, else 0.0. `answers` is a JSONL
    file of {"question" or "prompt", "answer"} rows (GSM8K's own layout works as it is); each prompt is matched to
    its row by the text of its last user message. `kind`: gsm8k or math."""
    table = {}
    for i, line in enumerate(Path(answers).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if "answer" not in row or not ({"question", "prompt"} & set(row)):
                raise ValueError(f"{answers}:{i}: expected 'question' (or 'prompt') and 'answer'")
            table[_prompt_key(row.get("question", row.get("prompt")))] = str(row["answer"])
    read = gsm8k_answer if kind == "gsm8k" else last_boxed
    out = []
    for prompt, response in zip(prompts, responses):
        key = _prompt_key(prompt)
        if key not in table:
            raise ValueError(f"{answers}: no answer for the prompt {key[:80]!r}")
        reference = table[key]
        gold = gsm8k_answer(reference) if kind == "gsm8k" else (last_boxed(reference) or reference)
        out.append(float(math_equal(read(response), gold)))
    return out
