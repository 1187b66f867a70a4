"""Self-Instruct: each filter of the paper applied and counted, classification tasks completed output-first and
the others input-first, rows SFT-ready and the run resumable; 20 seed tasks through `align data self-instruct` on a
tiny checkpoint; the tool-use variant keeps only trajectories whose calls parse and execute."""

import json
import subprocess
import sys

from conftest import ROOT, init_tiny_model
from sft.self_instruct import (
    encode_prompt,
    heuristic_reason,
    parse_instances,
    read_instructions,
    read_seed_tasks,
    self_instruct,
    tool_use_self_instruct,
)

SEEDS = ROOT / "examples/data/self_instruct_seed.jsonl"

NEW_TASKS = [
    "Name three rivers that flow through Germany and the seas they reach.",  # kept, input-first
    "Decide whether the sentence expresses anger, joy or sadness.",  # kept, classification
    "Draw a picture of a cat sitting on a fence.",  # blacklisted keyword
    "Sort.",  # too short
    "Write a program that prints the first ten primes.",  # write a program
    "Give three tips for staying very healthy.",  # ROUGE-L >= 0.7 with a seed
    "¿Cuál es la capital de Francia y por qué?",  # not ASCII
    "Explain why the sky looks blue during the day.",  # no instance (the scripted model gives none)
    "Suggest a weekend plan for a family visiting a small coastal town.",  # kept
]


class ScriptedLM:
    """Answers Self-Instruct's three prompts as a model would: new task lines, Yes/No, and instances."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, stops, max_tokens):
        self.calls.append(prompt)
        if prompt.startswith("Come up with a series of tasks:"):
            return " " + "\n".join(f"Task {i}: {t}" for i, t in enumerate(NEW_TASKS, 10))[len("Task 10: ") :]
        if prompt.startswith("Can the following task"):
            return " Yes" if "anger, joy" in prompt else " No"
        if "Class label" in prompt and "anger, joy" in prompt:
            return "Class label: joy\nSentence: We won the final!\nClass label: anger\nSentence: Who broke my bike?"
        if "sky looks blue" in prompt:
            return "I am not sure."
        return "Example 1\nInput: a sample input\nOutput: a sample output\nExample 2\nOutput: another output"


def test_the_filters_classification_and_instances(tmp_path):
    lm = ScriptedLM()
    out = tmp_path / "si.jsonl"
    report = self_instruct(lm, read_seed_tasks(str(SEEDS)), n=3, out=out, seed=0)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [NEW_TASKS[0], NEW_TASKS[1], NEW_TASKS[8]]
    assert [r["is_classification"] for r in rows] == [False, True, False]
    assert rows[1]["instances"] == [{"input": "We won the final!", "output": "joy"},
                                    {"input": "Who broke my bike?", "output": "anger"}]  # fmt: skip
    assert rows[0]["instances"][0] == {"input": "a sample input", "output": "a sample output"}
    assert rows[0]["messages"][0]["content"] == NEW_TASKS[0] + "\n\na sample input"
    assert report["dropped"] == {"blacklisted keyword": 1, "too short": 1, "write a program": 1,
                                 "similar to a kept instruction (ROUGE-L >= 0.7)": 1,
                                 "starts with a non-ASCII character": 1, "no instance": 1}  # fmt: skip
    assert report["kept"] == 3 and report["generated"] == 9 and report["classification"] == 1
    assert json.loads((tmp_path / "si.jsonl.report.json").read_text())["kept"] == 3
    first_prompt = lm.calls[0]
    assert first_prompt.count("\nTask ") == 9 and first_prompt.endswith("\nTask 9:")  # 8 seeds, then the next task
    # resumable: a second call with a larger n keeps the first rows and goes on (the same tasks are now duplicates)
    report = self_instruct(ScriptedLM(), read_seed_tasks(str(SEEDS)), n=4, out=out, seed=0, max_rounds=1)
    assert report["kept"] == 3 and len(out.read_text().splitlines()) == 3
    assert report["dropped"]["similar to a kept instruction (ROUGE-L >= 0.7)"] >= 4


def test_prompt_and_parsing_helpers():
    assert (
        encode_prompt(["A b c d.", "E f\ng h."])
        == "Come up with a series of tasks:\nTask 1: A b c d.\nTask 2: E f g h.\nTask 3:"
    )
    assert read_instructions(2, " First one here.\nTask 4: Second one here.") == ["First one here.", "Second one here."]
    assert heuristic_reason("Plot the sales figures by month please.") == "blacklisted keyword"
    assert heuristic_reason('"Quoted" instructions are dropped here.') == "starts with punctuation"
    assert heuristic_reason("Describe a good morning routine for students.") is None
    assert parse_instances("Output: just this", False) == [{"input": "", "output": "just this"}]


def test_twenty_seed_tasks_on_a_tiny_checkpoint(tmp_path):
    assert len(read_seed_tasks(str(SEEDS))) == 20
    init_tiny_model(tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "align.cli", "data", "self-instruct", "--model", str(tmp_path / "m"),
                          "--seed-tasks", str(SEEDS), "--n", "5", "--out", str(tmp_path / "si.jsonl"),
                          "--max-rounds", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "si.jsonl.report.json").read_text())
    assert report["rounds"] == 2 and report["generated"] >= 1
    assert report["kept"] + sum(report["dropped"].values()) == report["generated"]  # every one accounted for


def test_the_tool_use_variant_keeps_only_executed_trajectories(tmp_path):
    from align.tools.agent import Agent
    from align.tools.builtin import calculator
    from base_model import QwenTokenizer

    class Backend:
        tokenizer = QwenTokenizer.from_bytes()

        def continue_text(self, prompt_ids, stop=("Observation:",), max_tokens=None):
            text = self.tokenizer.decode(prompt_ids)
            question = text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            if "Observation:" in text.rsplit("<|im_start|>assistant\n", 1)[1]:
                return "Thought: I now know the final answer\nFinal Answer: done"
            if "18 times 4" in question:
                return 'Thought: multiply.\nAction: calculator\nAction Input: {"expression": "18*4"}\n'
            if "square root" in question:
                return "Thought: root.\nAction: calculator\nAction Input: sqrt(81)\n"  # not JSON: dropped
            return "Final Answer: I just know it."  # no tool call: dropped

    def complete(prompt, stops, max_tokens):
        return " What is 18 times 4 in total?\nQuestion 8: What is the square root of 81?\nQuestion 9: Who wrote Hamlet, the play?"

    agent = Agent(Backend(), [calculator()], max_steps=3)
    report = tool_use_self_instruct(complete, agent, ["What is 3 plus 4 altogether?"] * 7, n=5,
                                    out=tmp_path / "tools.jsonl", max_rounds=1)  # fmt: skip
    rows = [json.loads(l) for l in (tmp_path / "tools.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == ["What is 18 times 4 in total?"]
    assert rows[0]["tool_calls"][0]["observation"] == "72" and rows[0]["tools"][0]["function"]["name"] == "calculator"
    assert report["dropped"] == {"a tool call did not parse or execute": 1, "no tool call": 1}
