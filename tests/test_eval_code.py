"""`align eval humaneval|mbpp`: the harness scores HumanEval's canonical solutions (all 164, run in the sandbox) at
pass@1 = 1.0 and broken ones at 0; answers are read from model-style text; MBPP's real rows; a tiny checkpoint
answers all 164 problems end to end through the native engine."""

import json
import subprocess
import sys

import pytest

from align.core.records import DataError
from align.eval.code import extract_code, program, read_code_items
from align.eval.harness import evaluate, read_items
from conftest import FIXTURES, ROOT, init_tiny_model

MBPP = FIXTURES / "public_rows" / "mbpp_rows.jsonl"
quiet = {"log": lambda *_: None}


def test_humaneval_canonical_solutions_all_pass(tmp_path):
    summary = evaluate("humaneval", None, tmp_path, reference_answers=True, batch_size=64, **quiet)
    assert summary["items"] == 164
    assert summary["accuracy"] == 1.0, [
        (r["id"], r.get("notes")) for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    ][:5]


def test_humaneval_broken_solutions_all_fail(tmp_path):
    def broken(batch, ids):  # a body that cannot pass
        return [["```python\n    raise NotImplementedError\n```"] for _ in ids]

    summary = evaluate("humaneval", None, tmp_path, answerer=broken, batch_size=64, **quiet)
    assert summary["items"] == 164 and summary["accuracy"] == 0.0
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[0]["notes"][0].startswith("error: NotImplementedError")

    def mutated(batch, ids):  # the canonical solution with its result thrown away, and one that never ends
        return [["    result = 0\n", "    while True:\n        pass\n"] for _ in ids]

    summary = evaluate("humaneval", None, tmp_path / "m", answerer=mutated, limit=4, timeout_s=1, **quiet)
    assert summary["pass_at_k"]["2"] == 0.0


def test_model_style_answers_are_read_and_run(tmp_path):
    items = read_code_items(None, "humaneval")
    first = items[0]  # HumanEval/0, has_close_elements
    whole = (
        "Here is the function:\n\n```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float],"
        " threshold: float) -> bool:\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
        " for b in numbers[i + 1:])\n```\nIt compares every pair."
    )
    wrong = whole.replace("< threshold", "> threshold")
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"

    def answers(batch, ids):
        return [[whole, wrong, body]]

    summary = evaluate("humaneval", None, tmp_path, answerer=answers, limit=1, **quiet)
    row = json.loads((tmp_path / "results.jsonl").read_text())
    assert row["correct"] == [True, False, True] and summary["pass_at_k"]["1"] == pytest.approx(2 / 3)
    assert program(first, body).startswith(first["prompt"] + body)  # a body continues the prompt
    assert "check(has_close_elements)" in program(first, whole)


@pytest.mark.parametrize(
    "text, code",
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("Sure!\n```py\nx = 1\n```\nand\n```python\ny = 2\n```", "x = 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```python\nx = 1\nprint(x)", "x = 1\nprint(x)\n"),  # cut off before the closing fence
        ("def f():\n    return 1", "def f():\n    return 1\n"),  # no fence: the whole answer
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_mbpp_real_rows(tmp_path):
    items = read_items(str(MBPP), "mbpp")
    assert [it["id"] for it in items] == ["11", "12"] and items[0]["entry_point"] == "remove_Occ"
    assert 'assert remove_Occ("hello","l") == "heo"' in items[0]["question"]
    assert evaluate("mbpp", str(MBPP), tmp_path / "ref", reference_answers=True, **quiet)["accuracy"] == 1.0

    def answers(batch, ids):  # right for the matrix, wrong for the characters
        return [
            ["```python\ndef sort_matrix(M):\n    return sorted(M, key=sum)\n```"]
            if i == "12"
            else ["```python\ndef remove_Occ(s, ch):\n    return s[1:-1]\n```"]
            for i in ids
        ]

    summary = evaluate("mbpp", str(MBPP), tmp_path / "model", answerer=answers, **quiet)
    assert summary["accuracy"] == 0.5
    rows = [json.loads(l) for l in (tmp_path / "model" / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [[False], [True]] and "AssertionError" in rows[0]["notes"][0]


def test_bad_code_rows_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": 1, "text": "t", "test_list": []}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: an MBPP row needs"):
        read_items(str(bad), "mbpp")
    with pytest.raises(DataError, match="mbpp needs --data"):
        read_items(None, "mbpp")
    bad.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: a HumanEval row needs"):
        read_items(str(bad), "humaneval")


@pytest.mark.slow
def test_a_tiny_checkpoint_answers_all_164_problems(tmp_path):
    init_tiny_model(tmp_path / "model")
    run = subprocess.run([sys.executable, "-m", "align.cli", "eval", "humaneval", "--model", str(tmp_path / "model"),
                          "--out", str(tmp_path / "eval"), "--max-new-tokens", "16", "--batch-size", "41"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 164 and all(len(r["responses"]) == 1 and len(r["notes"]) == 1 for r in rows)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["items"] == 164 and summary["accuracy"] <= 0.05  # an untrained model: pass@1 near 0
    assert "HumanEval/163" in (tmp_path / "eval" / "report.html").read_text()
