"""`align eval code`: the code interpreter in the Qwen report's terms — how often the model's code runs, and how
often its answers are right.

Each item is a task with optional files for the session and what counts as right:
`{"question", "files": {name: text}?, "answer": "42"?, "expect_files": ["*.png"]?}`. The agent runs it with the
`python` tool (a sandboxed IPython session per item, its files uploaded first). Reported:

- **executable rate**: of all `python` calls, the share that ran without an error (the report's "executable rate");
- **accuracy**: of the items, the share whose final answer equals `answer` (numbers and expressions compared as
  `align eval math` does) and whose session holds a file matching each `expect_files` pattern (maths, data handling,
  and plots checked by the files they produce), with a 95% Wilson interval.

Writes `results.jsonl` (resumable), `summary.json` and the transcripts (`transcripts.jsonl`, SFT-ready).
"""

from __future__ import annotations

import fnmatch
import json
import tempfile
from pathlib import Path

from align.core.records import DataError, iter_records
from align.eval.answers import math_equal
from align.eval.harness import load_results, wilson
from align.tools.agent import Agent, transcript_row
from align.tools.builtin import python
from base_model.atomic import write_json_atomic


def read_code_tasks(path: str) -> list[dict]:
    items = []
    for where, row in iter_records(path):
        if not isinstance(row.get("question"), str):
            raise DataError(f"{where}: expected a 'question'")
        files = row.get("files") or {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise DataError(f"{where}: 'files' must map names to text")
        if row.get("answer") is None and not row.get("expect_files"):
            raise DataError(f"{where}: give 'answer' or 'expect_files' (or both)")
        items.append({"id": str(row.get("id", len(items))), "question": row["question"], "files": files,
                      "answer": None if row.get("answer") is None else str(row["answer"]),
                      "expect_files": list(row.get("expect_files") or [])})  # fmt: skip
    if not items:
        raise DataError(f"{path}: no tasks")
    return items


def answer_right(expected: str | None, answer: str | None) -> bool:
    if expected is None:
        return True
    if answer is None:
        return False
    return math_equal(answer.strip().rstrip("."), expected) or answer.strip().rstrip(".").lower() == expected.lower()


def evaluate_code(tasks: list[dict], out: str | Path, backend, max_steps: int = 6, timeout_s: float = 30.0,
                  log=print) -> dict:  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = load_results(results)
    for task in [t for t in tasks if t["id"] not in done]:
        work = Path(tempfile.mkdtemp(prefix="align-eval-code-"))
        for name, text in task["files"].items():
            target = (work / name).resolve()
            if work.resolve() not in target.parents:
                raise DataError(f"task {task['id']}: file name {name!r} leaves the session's directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        tool = python(work, timeout_s)
        agent = Agent(backend, [tool], max_steps=max_steps)
        try:
            run = agent.run(task["question"])
        finally:
            agent.close()
        produced = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and ".kernel" not in p.parts
                          and not p.name.startswith("."))  # fmt: skip
        files_ok = all(any(fnmatch.fnmatch(f, pat) or fnmatch.fnmatch(Path(f).name, pat) for f in produced)
                       for pat in task["expect_files"])  # fmt: skip
        calls = [c for c in run.tool_calls if c["name"] == "python"]
        ran = [c["ok"] for c in calls]  # the python tool fails a call whose cell raised, timed out or was restarted
        row = {"id": task["id"], "question": task["question"], "answer": run.answer, "expected": task["answer"],
               "right": answer_right(task["answer"], run.answer) and files_ok, "files_ok": files_ok,
               "produced": produced, "python_calls": len(calls), "python_ran": sum(ran), "stopped_by": run.stopped_by}  # fmt: skip
        done[task["id"]] = row
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with (out / "transcripts.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(transcript_row(run, [tool]), ensure_ascii=False) + "\n")
        log(f"[eval] code {task['id']}: {'right' if row['right'] else 'wrong'} ({row['python_ran']}/{len(calls)} ran)")
    rows = [done[t["id"]] for t in tasks]
    calls, ran, right = (
        sum(r["python_calls"] for r in rows),
        sum(r["python_ran"] for r in rows),
        sum(r["right"] for r in rows),
    )
    summary = {"tasks": len(rows), "python_calls": calls, "executable_rate": ran / calls if calls else None,
               "executable_ci95": wilson(ran, calls) if calls else None, "accuracy": right / len(rows),
               "accuracy_ci95": wilson(right, len(rows))}  # fmt: skip
    write_json_atomic(out / "summary.json", summary)
    log(f"[eval] code: {json.dumps(summary)}")
    return summary
