"""Tool-use evaluation in the report's terms (tool selection accuracy, Action Input ROUGE-L, false positives) and the
code interpreter's (executable rate, accuracy with answers and produced files), from scripted steps whose figures
are known; both commands end to end on a tiny checkpoint."""

import json
import subprocess
import sys

import pytest

from align.eval.tool_use import evaluate_tools, read_tool_items
from align.tools.code_eval import evaluate_code, read_code_tasks
from base_model import QwenTokenizer
from conftest import ROOT, init_tiny_model

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}  # fmt: skip
SEARCH = {"type": "function", "function": {"name": "search", "description": "Searches the web.",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}  # fmt: skip


def write_tool_items(path):
    rows = [
        {"id": "a", "question": "What is 12*7?", "tools": [CALC, SEARCH], "expected": {"name": "calculator", "arguments": {"expression": "12*7"}}},
        {"id": "b", "question": "Who won the 2018 World Cup?", "tools": [CALC, SEARCH], "expected": {"name": "search", "arguments": {"query": "2018 World Cup winner"}}},
        {"id": "c", "question": "Say hello.", "tools": [CALC, SEARCH], "expected": None},
        {"id": "d", "question": "Tell me a joke.", "tools": [CALC, SEARCH], "expected": None},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tool_use_figures(tmp_path):
    write_tool_items(tmp_path / "tools.jsonl")
    steps = {
        "What is 12*7?": 'Thought: compute.\nAction: calculator\nAction Input: {"expression": "12*7"}\n',  # right
        "Who won the 2018 World Cup?": 'Thought: compute?\nAction: calculator\nAction Input: {"expression": "2018"}\n',  # wrong tool
        "Say hello.": "Final Answer: Hello!",  # right: no tool
        "Tell me a joke.": 'Action: search\nAction Input: {"query": "joke"}',  # a false positive
    }  # fmt: skip
    answer = lambda batch: [steps[m[-1]["content"]] for m, _ in batch]
    summary = evaluate_tools(read_tool_items(str(tmp_path / "tools.jsonl")), tmp_path / "out", answer, log=lambda *_: 0)
    assert summary["tool_selection_accuracy"] == 0.5 and summary["false_positive_rate"] == 0.5
    # 1.0 for the right call; the wrong tool's input shares "2018" with the expected one: P 1/2, R 1/5, F 2/7
    assert summary["action_input_rouge_l"] == pytest.approx((1 + 2 / 7) / 2)
    assert (tmp_path / "out" / "report.html").exists()
    again = evaluate_tools(read_tool_items(str(tmp_path / "tools.jsonl")), tmp_path / "out", lambda b: 1 / 0,
                           log=lambda *_: 0)  # fmt: skip
    assert again == summary  # resumed: nothing asked again


class Coder:
    """Writes the code a task needs, then answers from the observation."""

    tokenizer = QwenTokenizer.from_bytes()

    def continue_text(self, prompt_ids, stop=("Observation:",), max_tokens=None):
        text = self.tokenizer.decode(prompt_ids)
        turn = text.rsplit("<|im_start|>assistant\n", 1)[1]
        if "Observation:" in turn:
            seen = turn.rsplit("Observation:", 1)[1].strip()
            return f"Thought: I now know the final answer\nFinal Answer: {seen.splitlines()[0]}"
        question = text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
        if "column b" in question:
            code = "import pandas as pd\\nprint(pd.read_csv('data.csv')['b'].sum())"
        elif "plot" in question:
            code = "import matplotlib.pyplot as plt\\nplt.plot([1, 2, 3])\\nplt.savefig('line.png')\\nprint('saved')"
        else:
            code = "print(1 / 0)"
        return f'Thought: use python.\nAction: python\nAction Input: {{"code": "{code}"}}\n'


def test_code_interpreter_figures(tmp_path):
    tasks = tmp_path / "code.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "sum", "question": "What is the sum of column b in data.csv?", "files": {"data.csv": "a,b\n1,2\n3,40\n"}, "answer": "42"},
        {"id": "plot", "question": "Make a line plot and save it as a PNG.", "expect_files": ["*.png"]},
        {"id": "div", "question": "Divide one by zero.", "answer": "1"},
    ]))  # fmt: skip
    summary = evaluate_code(read_code_tasks(str(tasks)), tmp_path / "out", Coder(), timeout_s=60, log=lambda *_: 0)
    assert summary["tasks"] == 3 and summary["python_calls"] == 3
    assert summary["executable_rate"] == pytest.approx(2 / 3) and summary["accuracy"] == pytest.approx(2 / 3)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert rows["sum"]["right"] and rows["sum"]["answer"] == "42"
    assert rows["plot"]["right"] and "line.png" in rows["plot"]["produced"]
    assert not rows["div"]["right"] and rows["div"]["python_ran"] == 0
    assert len((tmp_path / "out" / "transcripts.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_both_commands_on_a_tiny_checkpoint(tmp_path):
    init_tiny_model(tmp_path / "m")
    write_tool_items(tmp_path / "tools.jsonl")
    run = subprocess.run([sys.executable, "-m", "align.cli", "eval", "tools", "--model", str(tmp_path / "m"), "--data",
                          str(tmp_path / "tools.jsonl"), "--out", str(tmp_path / "t"), "--max-new-tokens", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["items"] == 4 and summary["need_a_tool"] == 2
    tasks = tmp_path / "code.jsonl"
    tasks.write_text(json.dumps({"question": "What is 2+2?", "answer": "4"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "align.cli", "eval", "code", "--model", str(tmp_path / "m"), "--data",
                          str(tasks), "--out", str(tmp_path / "c"), "--max-new-tokens", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["tasks"] == 1
