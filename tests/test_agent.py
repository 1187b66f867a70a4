"""The ReAct tool loop: tools run with their timeouts, problems come back as observations, the step limit holds, the
transcript is SFT data whose rendering is exactly the text the model continued (observations masked); the python
and files tools share a sandboxed directory; a tiny checkpoint runs the loop locally and through `align serve`."""

import json
import subprocess
import sys
import time

import pytest

from align.core.chatml import render
from align.tools.agent import Agent, EndpointBackend, LocalBackend, run_questions, run_tool
from align.tools.builtin import Tool, ToolError, builtin_tools, calculator, evaluate_arithmetic
from base_model import QwenForCausalLM, QwenTokenizer
from conftest import ROOT, init_tiny_model, tiny_config


@pytest.mark.parametrize(
    "expression, value",
    [
        ("12*7", 84),
        ("(2+3)**2 - 1", 24),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-3 + 10 % 4", -1),
        ("sqrt(16) + pi * 0", 4.0),
    ],
)
def test_calculator_reads_arithmetic(expression, value):
    assert evaluate_arithmetic(expression) == value


@pytest.mark.parametrize(
    "expression", ["__import__('os').system('id')", "().__class__", "open('x')", "9**9**9", "factorial(10**6)", "x+1",
                   "1/0", "2 +"],
)  # fmt: skip
def test_calculator_refuses_everything_else(expression):
    with pytest.raises(ToolError):
        evaluate_arithmetic(expression)


class Scripted:
    """A backend that answers with the next scripted step and records the text it was asked to continue."""

    def __init__(self, steps):
        self.tokenizer = QwenTokenizer.from_bytes()
        self.steps, self.asked = list(steps), []

    def continue_text(self, prompt_ids):
        self.asked.append(self.tokenizer.decode(prompt_ids))
        return self.steps.pop(0)


def test_the_loop_runs_tools_feeds_back_problems_and_writes_sft_data(tmp_path):
    slow = Tool("slow", "Sleeps.", {"type": "object", "properties": {}}, lambda a: time.sleep(5) or "late", 0.5)
    steps = [
        'Thought: compute it.\nAction: calculator\nAction Input: {"expression":"12*7"}\n',  # spacing kept as written
        'Thought: check.\nAction: weather\nAction Input: {"city": "Paris"}\n',  # unknown tool
        "Thought: again.\nAction: calculator\nAction Input: 12*7\n",  # not JSON
        "Thought: wait.\nAction: slow\nAction Input: {}\n",  # times out
        'Thought: divide.\nAction: calculator\nAction Input: {"expression": "1/0"}\n',  # the tool's own error
        "Thought: I now know the final answer\nFinal Answer: 84",
    ]
    backend = Scripted(steps)
    agent = Agent(backend, [calculator(), slow], max_steps=8)
    run = agent.run("What is 12*7?")
    assert run.answer == "84" and run.stopped_by == "final_answer" and run.steps == 6
    obs = [c["observation"] for c in run.tool_calls]
    assert obs[0] == "84" and "weather" in obs[1] and "JSON" in obs[2]
    assert "did not answer within" in obs[3] and obs[4].startswith("Error: ZeroDivisionError")
    # each step continued exactly the text of the steps and observations before it
    assert backend.asked[1].endswith('Action Input: {"expression":"12*7"}\nObservation: 84\n')
    assert backend.asked[0].endswith("<|im_start|>assistant\n") and "calculator: Call this tool" in backend.asked[0]
    # the transcript renders to the text the model saw, plus its last step
    tok = backend.tokenizer
    rendered = tok.decode(render(run.messages, tok, tools=[t.spec() for t in agent.tools]))
    assert rendered == backend.asked[-1] + steps[-1] + "<|im_end|>\n"
    out = tmp_path / "t.jsonl"
    run_questions(Agent(Scripted(steps), [calculator(), slow]), [{"question": "What is 12*7?"}], out, log=lambda *_: 0)
    run_questions(
        Agent(Scripted([]), [calculator()]), [{"question": "What is 12*7?"}], out, log=lambda *_: 0
    )  # resumed
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["answer"] == "84"
    from sft.data import load_examples

    examples, report = load_examples(str(out), tok, 4096, "assistant", "skip", "raise")
    ids, labels = examples[0]["input_ids"], examples[0]["labels"]
    trained = tok.decode([t for t, l in zip(ids, labels) if l != -100])
    assert "Action: calculator" in trained and "Final Answer: 84" in trained
    assert "Observation: 84" not in trained and "did not answer" not in trained  # observations are masked


def test_the_step_limit_holds():
    step = 'Thought: more.\nAction: calculator\nAction Input: {"expression": "1+1"}\n'
    run = Agent(Scripted([step] * 10), [calculator()], max_steps=3).run("Loop?")
    assert run.stopped_by == "max_steps" and run.answer is None and len(run.tool_calls) == 3


def test_python_and_files_share_a_sandboxed_directory(tmp_path):
    # a minute per cell: the first cells of a fresh kernel on a loaded machine (a fresh CI clone) can take seconds
    tools = builtin_tools(["python", "files"], tmp_path, python_timeout_s=60)
    python, files = tools
    try:
        assert run_tool(files, {"op": "write", "path": "data/n.txt", "content": "21"})[1]
        out, ok = run_tool(python, {"code": "v = int(open('data/n.txt').read()) * 2\nprint(v)"})
        assert ok and out == "42", out
        out, ok = run_tool(python, {"code": "import matplotlib.pyplot as plt\nplt.plot([v, 1]); plt.show()"})
        assert ok and out.startswith("[figure saved: figures/")
        assert "figures/figure-1.png" in run_tool(files, {"op": "list"})[0]
        assert not run_tool(files, {"op": "read", "path": "../../etc/passwd"})[1]
        out, ok = run_tool(python, {"code": "open('/etc/passwd').read()[:20]"})
        assert "PermissionError" in out
    finally:
        python.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    init_tiny_model(folder)
    return folder


def test_a_tiny_checkpoint_runs_the_loop_locally_and_through_align_serve(tiny_dir):
    from test_serve import start

    from align.serve import LocalModel

    llm = LocalModel.load(str(tiny_dir))
    local = Agent(LocalBackend(llm, max_tokens=24), [calculator()], max_steps=2).run("What is 2+3?")
    remote = Agent(EndpointBackend(start(llm), llm.tokenizer, max_tokens=24), [calculator()], max_steps=2)
    remote_run = remote.run("What is 2+3?")
    assert local.stopped_by in ("final_answer", "no_answer", "max_steps")
    assert (remote_run.stopped_by, remote_run.answer) == (
        local.stopped_by,
        local.answer,
    )  # same text, same greedy steps


def test_align_agent_on_the_command_line(tiny_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is 2+3?", "answer": "5"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "align.cli", "agent", "--model", str(tiny_dir), "--tools",
                          "calculator,files", "--questions", str(questions), "--transcript", str(tmp_path / "t.jsonl"),
                          "--max-steps", "2", "--max-tokens", "16"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads((tmp_path / "t.jsonl").read_text())
    assert row["question"] == "What is 2+3?" and [t["function"]["name"] for t in row["tools"]] == [
        "calculator",
        "files",
    ]
    bad = subprocess.run([sys.executable, "-m", "align.cli", "agent", "--model", str(tiny_dir), "--tools", "shell",
                          "--question", "x"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "unknown tools" in bad.stderr


def test_a_full_context_ends_the_run():
    from align.serve import LocalModel

    tok = QwenTokenizer.from_bytes()
    model = QwenForCausalLM(tiny_config(vocab_size=(len(tok) + 127) // 128 * 128, max_position_embeddings=256))
    run = Agent(LocalBackend(LocalModel(model.eval(), tok), max_tokens=64), [calculator()]).run("What is 2+3?")
    assert run.stopped_by == "context_full" and run.steps == 0
