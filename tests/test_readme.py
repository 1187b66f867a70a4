"""Every command the README's shell blocks show, run in the README's order in one fresh folder, as a reader would:
each command reads what the ones before it wrote. The reader's own inputs (`raw.jsonl`, `zh.jsonl`, prompts, a
reference model…) are made here first.

What differs from the README, and why, is all in `SMALL`, `CAPS` and `ELSEWHERE`: tiny values where the README shows
the report's sizes, a step cap appended to each training run (the tiny configs train for minutes; here only that
the commands compose is checked, their learning is the stage tests' job), and the sweeps, which another test runs.
Of the two set-up commands, CI runs the tests' and `test_demo.py` the main job's `align demo` (as `--quick`).
"""

import glob
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from align.core.distributed import subprocess_env
from conftest import ROOT, align_ok

ELSEWHERE = {  # command -> the test that runs it
    "align sweep configs/sweeps/tiny.yaml": "tests/test_demo.py::test_sweep_on_the_demo_world_ranks_by_gold",
    "align sweep configs/sweeps/tiny.yaml out_dir=runs/s2 parallel=2": "the same test (parallel=2)",
    "align eval gsm8k --model runs/ppo-tiny/final/policy --data gsm8k_test.jsonl --out runs/eval-gsm8k": "tests/test_eval_harness.py (real GSM8K rows; a checkpoint and an endpoint)",
    "align eval math --endpoint http://localhost:8000/v1 --endpoint-model Qwen-7B-Chat --data math_test.jsonl "
    "--out runs/eval-math --samples 4": "tests/test_eval_harness.py (an endpoint; MATH's layout)",
    "align eval humaneval --model runs/sft-tiny/final --out runs/eval-humaneval --samples 10": "tests/test_eval_code.py"
    "::test_a_tiny_checkpoint_answers_all_164_problems (greedy; sampling as in tests/test_eval_harness.py)",
    "align eval mbpp --endpoint http://localhost:8000/v1 --data mbpp_test.jsonl --out runs/eval-mbpp": "tests/test_eval_"
    "code.py::test_mbpp_real_rows (real MBPP rows; endpoints as in tests/test_eval_harness.py)",
    "align eval humaneval --reference-answers --out runs/eval-humaneval-check": "tests/test_eval_code.py::test_"
    "humaneval_canonical_solutions_all_pass",
    "align serve --model runs/sft-tiny/final --port 8000": "tests/test_serve.py (the openai client against the server)",
    "align agent --endpoint http://localhost:8000/v1 --tokenizer runs/sft-tiny/final --questions questions.jsonl "
    "--transcript runs/agent.jsonl": "tests/test_agent.py::test_a_tiny_checkpoint_runs_the_loop_locally_and_through_"
    "align_serve and ::test_align_agent_on_the_command_line",
    "align eval tools --model runs/sft-tiny/final --data tool_items.jsonl --out runs/eval-tools": "tests/test_eval_tools"
    ".py (scripted steps with known figures; the command on a tiny checkpoint)",
    "align eval code --model runs/sft-tiny/final --data code_tasks.jsonl --out runs/eval-code": "tests/test_eval_tools.py",
    "align sweep configs/sweeps/ppo-methods.yaml": "tests/test_ppo_train.py::test_sweep_over_a_ppo_config_runs_in_"
    "parallel_and_resumes_after_a_kill (a PPO config made in the test, 4 trials)",
}
SMALL = [  # (as the README shows it, as run here)
    ("--base cl100k_base --corpus zh.jsonl --vocab-size 160000", "--base bytes --corpus zh.jsonl --vocab-size 700"),
    ("--seq-len 2048", "--seq-len 128"),
    ("--n 50000", "--n 20"),
    ("--model REF_MODEL", "--model ref-model"),
    ("--port 7860", "--port {port}"),
]
CAPS = {  # a training command's first words -> overrides appended
    "align sft": "train.max_steps=4",
    "torchrun --nproc_per_node 2 -m align.cli sft": "train.max_steps=4",
    "align pretrain": "train.max_steps=4",
    "align dpo": "train.max_steps=4",
    "align rm pmp": "train.max_steps=4",
    "align rm train": "train.max_steps=6",
    "align ppo": "ppo.iterations=2 train.eval_every=0",
    "torchrun --nproc_per_node 2 -m align.cli ppo": "ppo.iterations=1 train.eval_every=0",
}
SETUP_BLOCKS = ("main-job", "tests")  # the two set-up commands: CI runs one, test_demo the other


def readme_shell_commands() -> list[str]:
    """Each command line of the README's bash blocks (continuations joined, trailing comments dropped), in order,
    leaving out the two set-up blocks."""
    text = (ROOT / "README.md").read_text()
    for name in SETUP_BLOCKS:
        text = re.sub(rf"<!-- {name} -->\s*```(?:bash|sh)\n.*?```", "", text, flags=re.S)
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.split("  #")[0]).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def as_run_here(command: str, port: int) -> str:
    for shown, small in SMALL:
        command = command.replace(shown, small.format(port=port))
    for start, caps in CAPS.items():
        if command.startswith(start + " "):
            command += " " + caps
    return command


def make_inputs(folder: Path) -> None:
    """What a reader brings: a small web crawl with duplicates, an evaluation set, Chinese text, raw tags, prompts,
    conversations to score, guidelines, a taxonomy, and a reference model for perplexity."""
    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghiklmnoprstuvw") for _ in range(rng.randint(4, 8))) for _ in range(300)]
    vocabulary += ["the", "and", "of", "to", "with", "that"] * 10  # stop words, as in English prose
    docs = [" ".join(rng.choice(vocabulary) for _ in range(80)) + "." for _ in range(30)]
    rows = [{"text": d} for d in docs] + [{"text": docs[0]}]  # one exact duplicate

    def jsonl(name: str, items: list[dict]) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))

    jsonl("raw.jsonl", rows)
    jsonl("code.jsonl", [{"text": f"def f{i}(x):\n    # v{i}\n    return x * {i} + {i * i}\n"} for i in range(20)]
          + [{"text": "# Copyright 2020\ndef f3(x):\n  return x * 3 + 9\n"}])  # fmt: skip
    jsonl("instructions.jsonl", [{"messages": [{"role": "user", "content": f"Sum {i} and {i}."},
                                               {"role": "assistant", "content": str(2 * i)}]} for i in range(10)])  # fmt: skip
    jsonl("good.jsonl", [{"text": d} for d in docs])
    jsonl("junk.jsonl", [{"text": " ".join(rng.choice(["buy", "now", "free", "click", "$$$"]) for _ in range(30))}
                         for _ in range(30)])  # fmt: skip
    jsonl("eval/bench.jsonl", [{"text": docs[3]}])  # a leaked evaluation item: decontamination drops it
    jsonl("zh.jsonl", [{"text": "今天天气很好，我们去公园散步。" * (i % 5 + 1)} for i in range(40)])
    jsonl(
        "raw_tags.jsonl", [{"tags": ["math", "arithmetic"] if i % 2 else ["translation", "chinese"]} for i in range(40)]
    )
    jsonl("prompts.jsonl", [{"prompt": f"What is {i}+{i}?", "tags": ["math/arithmetic"]} for i in range(6)])
    jsonl("convs.jsonl", [{"prompt": "What is 2+3?", "response": "2+3 = 5."}, {"prompt": "Hi", "response": "Hello"}])
    (folder / "guidelines.md").write_text("Rank the most helpful and harmless answer first.\n")
    (folder / "taxonomy.yaml").write_text((ROOT / "configs/taxonomy/demo.yaml").read_text())
    for name in ("configs", "examples"):
        (folder / name).symlink_to(ROOT / name)
    run_shell("align init-model configs/model/tiny.yaml --fit-vocab --tokenizer bytes --out ref-model", folder)


def run_shell(command: str, folder: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(subprocess_env(), PYTHONPATH=str(ROOT), PASSWORD="alice-password")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    out = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def expand_words(command: str, cwd: Path) -> list[str]:
    """A command line's words as the shell would give them in `cwd` (quotes, and `*` patterns expanded)."""
    words = []
    for word in shlex.split(command):
        words += (sorted(glob.glob(word, root_dir=cwd)) or [word]) if "*" in word else [word]
    return words


def run_here(command: str, folder: Path) -> None:
    """An `align …` line in this process, as the shell would split and expand it: the walk-through spends its time in
    the commands rather than in 30 interpreter starts."""
    align_ok(*expand_words(command, folder)[1:], cwd=folder)


def serve_briefly(command: str, folder: Path, port: int) -> None:
    """`align label serve` runs until stopped: start it, wait for its page and API, stop it."""
    env = dict(subprocess_env(), PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                login = httpx.post(
                    f"http://127.0.0.1:{port}/api/login", json={"username": "alice", "password": "alice-password"}
                )
                assert page.status_code == 200 and login.status_code == 200, (page.status_code, login.text)
                return
            except httpx.TransportError:
                time.sleep(0.5)
        raise AssertionError(f"{command}: no answer in 120 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_readme_commands_are_listed_in_order_with_their_deviations():
    commands = readme_shell_commands()
    assert len(commands) >= 30
    for shown, _ in SMALL:
        assert any(shown in c for c in commands), f"README no longer shows {shown!r}: update SMALL"
    for start in CAPS:
        assert any(c.startswith(start + " ") for c in commands), f"README no longer shows {start!r}: update CAPS"
    for command, where in ELSEWHERE.items():
        assert command in commands, f"README no longer shows {command!r}: update ELSEWHERE"
        test_file, _, test_name = where.partition("::")
        if test_name:
            assert f"def {test_name.split()[0]}(" in (ROOT / test_file).read_text(), where


@pytest.mark.slow
def test_every_readme_command_runs_in_order_in_a_fresh_folder(tmp_path):
    from align.bench_label import free_port

    make_inputs(tmp_path)
    port = free_port()
    ran = []
    for shown in readme_shell_commands():
        if shown in ELSEWHERE:
            continue
        command = as_run_here(shown, port)
        if shlex.split(command)[:3] == ["align", "label", "serve"]:
            serve_briefly(command, tmp_path, port)
        elif command.startswith("align ") and "|" not in command:
            run_here(command, tmp_path)
        else:
            run_shell(command, tmp_path)
        ran.append(command)
    # what the walk-through should have left behind
    for path in (
        "dedup.jsonl",
        "train.jsonl",
        "my.tiktoken",
        "packed/index.json",
        "runs/pretrain-tiny/final/config.json",
        "runs/sft-tiny/final/config.json",
        "runs/sft-tiny-zero3/final/config.json",
        "runs/rm-tiny/final/reward_head.safetensors",
        "scored.jsonl",
        "taxonomy/taxonomy.yaml",
        "audit/report.html",
        "runs/ppo-tiny/metrics.jsonl",
        "runs/ppo-tiny-zero3/metrics.jsonl",
        "tasks.jsonl",
        "audit.jsonl",
        "comparisons.jsonl",
    ):
        assert (tmp_path / path).exists(), (path, ran)
    assert len(ran) == len(readme_shell_commands()) - len(ELSEWHERE)
    finetune = (tmp_path / "runs/rm-tiny/config.yaml").read_text()  # fine-tuned from the PMP model
    assert "stage: finetune" in finetune and "rm-pmp-tiny/final" in finetune
