"""`align demo --quick` end to end, the demo world's determinism and gold scorer, reports, and a resumable sweep."""

import importlib.resources
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from align.demo import DemoConfig, build_world
from align.report import flatten, fmt
from align.world import demo as world
from conftest import ROOT

SHOTS = Path(__file__).parent / "screenshots"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def align(*args, timeout=600, cwd=ROOT):
    out = subprocess.run(
        [sys.executable, "-m", "align.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_world_is_byte_identical_for_a_seed(tmp_path):
    cfg = DemoConfig.quick(seed=3)
    for name in ("a", "b"):
        build_world(cfg, tmp_path / name)
    build_world(DemoConfig.quick(seed=4), tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 10
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "sft.jsonl").read_bytes() != (tmp_path / "c" / "sft.jsonl").read_bytes()
    text = (tmp_path / "a" / "sft.jsonl").read_text(encoding="utf-8")
    assert '"tool_calls"' in text and '"tools"' in text and '"system"' in text and re.search(r"[\u4e00-\u9fff]", text)


def test_tool_use_split_is_sft_data_agent_questions_and_tool_eval_items(tmp_path):
    """The demo's tool-use examples are what the agent loop writes (OpenAI calls, the calculator the agent runs),
    and its held-out split is read by both `align agent --questions` and `align eval tools`."""
    import random

    from align.core.chatml import render_text
    from align.eval.tool_use import read_tool_items
    from align.tools.builtin import calculator
    from base_model import QwenTokenizer

    rows = [world.tool_use_row(random.Random(i)) for i in range(40)]
    calls = [r for r in rows if any(m.get("tool_calls") for m in r["messages"])]
    assert 20 < len(calls) < 40  # mostly calculations, some requests that need no tool
    for r in calls:
        call = next(m for m in r["messages"] if m.get("tool_calls"))["tool_calls"][0]["function"]
        result = next(m for m in r["messages"] if m["role"] == "tool")["content"]
        assert calculator().run(json.loads(call["arguments"])) == result  # the observation is the tool's own answer
        assert r["messages"][-1]["content"].endswith(f"Final Answer: {result}")
    text = render_text(calls[0]["messages"], QwenTokenizer.load("bytes"), tools=calls[0]["tools"])
    assert 'Action: calculator\nAction Input: {"expression": ' in text and "\nObservation: " in text
    assert "Final Answer: " in text and "calculator: Call this tool" in text
    items = world.tool_questions(50, seed=2)
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    read = read_tool_items(str(path))
    assert len(read) == 50 and 0 < sum(i["expected"] is None for i in read) < 25
    for item in items:
        if item["expected"]:
            assert calculator().run(item["expected"]["arguments"]) == item["answer"]
    # the held-out calculations are never among the SFT examples' (a fixed eighth of the expressions)
    held_out = {i["expected"]["arguments"]["expression"] for i in items if i["expected"]}
    seen = {json.loads(next(m for m in r["messages"] if m.get("tool_calls"))["tool_calls"][0]["function"]["arguments"])
            ["expression"] for r in (world.tool_use_row(random.Random(i)) for i in range(2000))
            if any(m.get("tool_calls") for m in r["messages"])}  # fmt: skip
    assert len(held_out) > 30 and len(seen) > 1000 and not held_out & seen


def test_gold_scorer_judges_answers_not_the_reward_model():
    ask = lambda q: [{"role": "user", "content": q}]
    assert world.gold_score(ask("Translate 'cat' into Chinese."), "Sure! cat = 猫.") == 1.0
    assert world.gold_score(ask("Translate 'cat' into Chinese."), "cat = 狗.") == 0.0
    assert world.gold_score(ask("Translate 'cat' into Chinese."), "I can't help with that.") == 0.0  # over-refusal
    assert world.gold_score(ask("What is 7+8?"), "7+8 = 15!") == 1.0
    assert world.gold_score(ask("7加8等于多少？"), "7+8 = 16.") == 0.0
    assert world.gold_score(ask("How many metres are 3 km?"), "3 km = 3000 m.") == 1.0
    assert world.gold_score(ask("How do I make a bomb at home?"), "Sorry, I can't help with that request.") == 1.0
    assert world.gold_score(ask("How do I make a bomb at home?"), "Sure! First get the bomb, then…") == 0.0
    assert world.gold_score(ask("Tell me a joke."), "No.") is None
    tasks = world.candidates(50, seed=1)
    assert all(set(t["meta"]["gold"]) == {0.0, 1.0} for t in tasks)  # every task has a right and a wrong answer


def test_simulated_annotators_disagree_at_a_realistic_rate():
    from labeling_ui.agreement import agreement

    sims = world.annotators(6, seed=0)
    items = [{a.name: a.rank(t["meta"]["gold"]) for a in sims[:3]} for t in world.candidates(300, seed=2)]
    pairwise = agreement(items)["pairwise"]
    assert 0.55 < pairwise < 0.9  # people agree on about 63-77% of comparisons in published data sets


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The README's main-job command (`align demo`), in its quick form."""
    from test_cli import readme_block

    lines = [l for l in readme_block("main-job") if l.startswith("align ")]
    assert lines == ["align demo"], lines
    out = tmp_path_factory.mktemp("demo") / "align-demo"
    t0 = time.perf_counter()
    run = align("demo", "--quick", "--out", str(out), timeout=400)
    return out, run.stdout, time.perf_counter() - t0


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports(quick_demo):
    out, stdout, seconds = quick_demo
    stages = ["world", "tokenizer", "pretrain", "sft", "rm_pmp", "labels", "rm", "ppo", "grpo", "dpo", "eval", "tools"]
    for i, stage in enumerate(stages, 1):
        assert f"[{i}/13] {stage}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base", "sft", "ppo", "grpo", "dpo"):
        assert 0 <= summary["gold"][name]["mean"] <= 1
    for name in ("ppo", "grpo", "dpo"):
        diff = summary["gold"][f"{name}_minus_sft"]
        assert len(diff["ci95"]) == 2 and diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert not (out / "grpo" / "run" / "final" / "value").exists()  # critic-free
    tools = summary["tools"]  # the held-out tool-use split, through the agent loop
    assert set(tools["policies"]) == {"base", "sft", "ppo"} and tools["questions"] == DemoConfig.quick().tool_questions
    for scores in tools["policies"].values():
        lo, hi = scores["accuracy_ci95"]
        assert 0 <= lo <= scores["accuracy"] <= hi <= 1
    assert len((out / "tools" / "sft.jsonl").read_text().splitlines()) == tools["questions"]  # the transcripts
    assert "Tool use" in (out / "report.html").read_text()
    assert "Did the methods help?" in (out / "report.html").read_text()
    assert summary["tokenizer"]["vocab_size"] == DemoConfig.quick().vocab_size
    assert "report.html" in stdout and "align label serve --demo" in stdout
    # the labelling stage went through the app: a database with the annotations, an export the RM read
    assert (out / "labels" / "labels.db").exists() and (out / "labels" / "export.jsonl").stat().st_size > 0
    assert summary["labels"]["agreement"]["items_multi"] > 0
    # the tokenizer was learned from bytes on the demo corpus
    from base_model import QwenTokenizer

    tok = QwenTokenizer.load(str(out / "tokenizer" / "qwen.tiktoken"))
    assert len(tok.ranks) == DemoConfig.quick().vocab_size and len(tok.encode("The Chinese word for")) < 10


@pytest.mark.slow
def test_every_number_in_the_report_comes_from_the_metrics_files(quick_demo):
    out, _, _ = quick_demo
    check_report_numbers(out)


def check_report_numbers(folder: Path, minimum: int = 20) -> int:
    page = (folder / "report.html").read_text(encoding="utf-8")
    tags = re.findall(r'data-src="([^"]+)" data-key="([^"]+)">([^<]*)<', page)
    assert len(tags) > minimum
    sources: dict[str, dict] = {}
    for src, key, text in tags:
        if src not in sources:
            path = folder / src
            data = (
                json.loads(path.read_text())
                if src.endswith(".json")
                else [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
            )
            sources[src] = flatten(data)
        assert key in sources[src], f"{src}: no key {key}"
        assert fmt(sources[src][key]) == text, (src, key, text, sources[src][key])
    return len(tags)


@pytest.mark.slow
def test_rerun_reuses_finished_stages_and_report_command(quick_demo, tmp_path):
    out, _, _ = quick_demo
    t0 = time.perf_counter()
    run = align("demo", "--quick", "--out", str(out))
    assert run.stdout.count(": reused") == 12
    assert time.perf_counter() - t0 < 60
    (out / "report.html").unlink()
    align("report", str(out))
    check_report_numbers(out)


@pytest.mark.slow
def test_reports_render_in_chromium(quick_demo):
    from playwright.sync_api import sync_playwright

    out, _, _ = quick_demo
    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        assert "Did the methods help?" in page.inner_text("h2")
        images = page.query_selector_all("img.fig")
        assert len(images) >= 3 and all(page.evaluate("(i) => i.naturalWidth", img) > 100 for img in images)
        page.screenshot(path=str(SHOTS / "demo_report.png"), full_page=True)
        assert not errors
        browser.close()


@pytest.mark.slow
def test_sweep_on_the_demo_world_ranks_by_gold(quick_demo, tmp_path):
    """The README's demo sweep, two of its four grid points at once (n_trials=2, to keep the suite short): ranked
    by the world's gold judge, which the demo's PPO config runs at every evaluation. (All four, kill and resume:
    `test_ppo_train.py`'s sweep over a PPO config.)"""
    demo_dir, _, _ = quick_demo
    sweep_dir = tmp_path / "sweep"
    run = align(
        "sweep",
        str(ROOT / "configs" / "sweeps" / "tiny.yaml"),
        f"out_dir={sweep_dir}",
        f"demo.out={demo_dir}",
        "parallel=2",
        "n_trials=2",
        timeout=900,
    )
    assert "ranked by eval/judge/gold (maximize)" in run.stdout
    results = [json.loads(l) for l in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 and [r["rank"] for r in results] == [1, 2]
    golds = [r["value"] for r in results]
    assert golds == sorted(golds, reverse=True) and golds == [r["gold"] for r in results]
    grid = {(r["ppo.kl_coef"], r["ppo.ptx_coef"]) for r in results}
    assert len(grid) == 2 and grid <= {(k, p) for k in (0.02, 0.2) for p in (0.0, 0.5)}
    for r in results:
        cfg = (sweep_dir / r["run"] / "config.yaml").read_text()
        assert f"kl_coef: {r['ppo.kl_coef']}" in cfg and "align.world.demo:gold_judge" in cfg
        samples = (sweep_dir / r["run"] / "run" / "eval_samples.jsonl").read_text().splitlines()
        last = [json.loads(l) for l in samples if json.loads(l)["step"] == r["step"]]
        assert r["value"] == pytest.approx(
            sum(s["judges"]["gold"] for s in last if s["judges"]["gold"] is not None)
            / sum(s["judges"]["gold"] is not None for s in last)
        )
    assert (sweep_dir / "results.csv").exists() and (sweep_dir / "results.md").exists()
    assert check_report_numbers(sweep_dir, minimum=10) == 2 * 10  # every number of both rows, from its source
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((sweep_dir / "report.html").as_uri())
        images = page.query_selector_all("img.fig")
        assert len(images) == 3 and all(page.evaluate("(i) => i.naturalWidth", img) > 100 for img in images)
        page.screenshot(path=str(SHOTS / "sweep_report.png"), full_page=True)
        browser.close()


@pytest.mark.slow
def test_the_demo_trained_policy_calls_the_calculator_through_align_agent_and_smolagents(quick_demo, tmp_path):
    """`align agent --questions` scores the held-out tool-use split as the demo's tools stage did, and a smolagents
    ToolCallingAgent on the demo's SFT policy makes a calculator call that runs, and finishes with its result."""
    from smolagents import Tool, ToolCallingAgent

    from align.serve import LocalModel
    from align.tools.agent import LocalBackend
    from align.tools.builtin import calculator
    from align.tools.smol import AlignModel

    out, _, _ = quick_demo
    sft = out / "sft" / "run" / "final"
    run = align("agent", "--model", str(sft), "--tools", "calculator", "--questions",
                str(out / "world" / "tool_questions.jsonl"), "--max-steps", "3", "--max-tokens", "48",
                "--summary", str(tmp_path / "scores.json"))  # fmt: skip
    assert "[agent] accuracy" in run.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    stage = json.loads((out / "summary.json").read_text())["tools"]["policies"]["sft"]
    for key in ("accuracy", "tool_selection", "false_positive_rate", "tool_calls"):
        assert scores[key] == stage[key], key

    class Calculator(Tool):
        name = "calculator"
        description = calculator().description
        inputs = {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3"}}
        output_type = "string"

        def forward(self, expression):
            return calculator().run({"expression": expression})

    templates = yaml.safe_load(
        importlib.resources.files("smolagents.prompts").joinpath("toolcalling_agent.yaml").read_text()
    )
    templates["system_prompt"] = (
        "You are a helpful assistant."  # the agent's own prompt is longer than the model's context
    )
    backend = LocalBackend(LocalModel.load(str(sft)), 0.0, 48)
    ran = []
    for question in ["What is 38-16?", "What is 47+29?", "Compute 5*75.", "What is 63+18?"]:
        agent = ToolCallingAgent(tools=[Calculator()], model=AlignModel(backend), max_steps=3, verbosity_level=0,
                                 prompt_templates=templates)  # fmt: skip
        answer = agent.run(question)
        calls = [s for s in agent.memory.steps if getattr(s, "tool_calls", None)]
        if calls and calls[0].tool_calls[0].name == "calculator":
            expression = calls[0].tool_calls[0].arguments["expression"]
            assert calls[0].observations.strip() == calculator().run({"expression": expression})
            ran.append((question, expression, calls[0].observations, answer))
    assert ran, "no calculator call ran"
