"""`align eval gsm8k|math`: real GSM8K rows asked of an OpenAI-compatible endpoint (a real HTTP server here that
answers one right and one wrong), resumed without asking again, sampled with pass@k; MATH's layout; a checkpoint
through the native engine."""

import json
import subprocess
import sys

import pytest

from align.core.records import DataError
from align.eval.harness import evaluate, read_items, wilson
from conftest import FIXTURES, ROOT, ChatServer, serve

GSM8K = FIXTURES / "public_rows" / "gsm8k_train_rows.jsonl"


class Student(ChatServer):
    """Right about Natalia's clips (72), wrong about Weng (12) except when sampling with seed 1."""

    asked: list = []

    def reply(self, body: dict) -> dict:
        Student.asked.append(body)
        question = body["messages"][-1]["content"]
        if "Natalia" in question:
            text = "48/2 = 24 in May, 48 + 24 = 72 in all. The answer is 72."
        elif "boxed" in question:
            text = "Half of 3/2 is \\boxed{\\dfrac{3}{4}}."
        else:
            text = "She earned 10 dollars. The answer is 10." if body.get("seed") == 1 else "The answer is 12."
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def endpoint():
    Student.asked = []
    yield from serve(Student)


def test_gsm8k_on_an_endpoint_scores_resumes_and_reports(endpoint, tmp_path):
    summary = evaluate("gsm8k", str(GSM8K), tmp_path, endpoint=endpoint, endpoint_model="student", log=lambda *_: 0)
    assert (
        summary["items"] == 2 and summary["accuracy"] == 0.5 and summary["accuracy_ci95"] == pytest.approx(wilson(1, 2))
    )
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["reference"], r["predicted"], r["correct"]) for r in rows] == [
        ("72", ["72"], [True]),
        ("10", ["12"], [False]),
    ]
    assert {b["model"] for b in Student.asked} == {"student"} and all(b["temperature"] == 0.0 for b in Student.asked)
    assert "step by step" in Student.asked[0]["messages"][-1]["content"]
    page = (tmp_path / "report.html").read_text()
    assert page.count("✔") == 1 and page.count("✘") == 1
    asked = len(Student.asked)  # a second run answers nothing again
    assert evaluate("gsm8k", str(GSM8K), tmp_path, endpoint=endpoint, log=lambda *_: 0) == summary
    assert len(Student.asked) == asked


def test_sampled_answers_give_pass_at_k(endpoint, tmp_path):
    summary = evaluate("gsm8k", str(GSM8K), tmp_path, endpoint=endpoint, samples=2, log=lambda *_: 0)
    assert summary["samples"] == 2 and {b["seed"] for b in Student.asked} == {0, 1}
    assert summary["pass_at_k"] == {"1": 0.75, "2": 1.0}  # Natalia 2/2 right, Weng 1/2


def test_math_layout_and_bad_rows(endpoint, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"problem": "What is half of 3/2?", "solution": "It is $\\boxed{\\frac34}$.",
                                "unique_id": "test/algebra/1.json"}) + "\n")  # fmt: skip
    summary = evaluate("math", str(data), tmp_path / "out", endpoint=endpoint, log=lambda *_: 0)
    assert summary["accuracy"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no final number"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: no final answer"):
        read_items(str(bad), "gsm8k")
    with pytest.raises(DataError, match="exactly one of --model"):
        evaluate("gsm8k", str(GSM8K), tmp_path / "x", log=lambda *_: 0)


def test_a_checkpoint_through_the_native_engine(tmp_path):
    """The command on a tiny untrained checkpoint: every item answered and scored (wrongly, most likely)."""
    out = subprocess.run([sys.executable, "-m", "align.cli", "init-model", str(ROOT / "configs/model/tiny.yaml"),
                          "--tokenizer", "bytes", "--fit-vocab", "--out", str(tmp_path / "model")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "align.cli", "eval", "gsm8k", "--model", str(tmp_path / "model"),
                          "--data", str(GSM8K), "--out", str(tmp_path / "eval"), "--max-new-tokens", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1"] and all(len(r["responses"]) == 1 for r in rows)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["items"] == 2
