"""The SFT recipe end to end on CPU: memorisation, generation, ZeRO-3 on 2 processes, kill and resume."""

import os
import subprocess
import sys

import pytest

from align.core.metrics import read_metrics
from conftest import ROOT, kill_after_first_checkpoint

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
TINY = str(ROOT / "configs" / "sft" / "tiny.yaml")


def align(*args, cwd=ROOT, timeout=600):
    out = subprocess.run(
        [sys.executable, "-m", "align.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.slow
def test_tiny_recipe_memorises_and_answers(tmp_path):
    align("sft", TINY, f"out_dir={tmp_path}")
    curve = losses(tmp_path)
    assert curve[max(curve)] < 0.1, curve
    out = align(
        "generate",
        "--model",
        str(tmp_path / "final"),
        "--prompt",
        "What is 2+3?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
    )
    assert out.stdout.strip() == "2+3 = 5."
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_zero3_two_processes_follow_single_process(tmp_path):
    """Same global batch (2 x 1 process vs 1 x 2 processes): losses agree within 1e-5 (measured: 6e-7)."""
    common = ["train.max_steps=12", "train.log_every=1", "train.save_every=0"]
    align("sft", TINY, f"out_dir={tmp_path / 'one'}", *common)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.cli"]
    out = subprocess.run(
        torchrun
        + ["sft", TINY, f"out_dir={tmp_path / 'two'}", "deepspeed.zero_stage=3", "train.micro_batch_size=1", *common],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    common = [
        "train.max_steps=60",
        "train.log_every=1",
        "train.save_every=10",
        "optim.warmup_steps=5",
        "data.eval_fraction=0.25",
        "train.eval_every=20",
    ]
    align("sft", TINY, f"out_dir={tmp_path / 'full'}", *common)
    run_dir = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(["sft", TINY, f"out_dir={run_dir}", *common], run_dir, ENV)
    assert 10 <= killed_at < 60, "the run was killed mid-way"
    align("sft", TINY, f"out_dir={run_dir}", "resume=true", *common)
    full, resumed = losses(tmp_path / "full"), losses(run_dir)
    assert sorted(resumed) == list(range(1, 61))
    for step in range(killed_at + 1, 61):
        assert abs(full[step] - resumed[step]) < 1e-6, (step, full[step], resumed[step])
    evals = lambda d: {r["step"]: r["eval/loss"] for r in read_metrics(d) if "eval/loss" in r}
    assert sorted(evals(run_dir)) == [20, 40, 60] and evals(run_dir)[60] == pytest.approx(evals(tmp_path / "full")[60])


@pytest.mark.slow  # end-to-end through the command line
def test_resume_with_other_settings_stops_naming_the_difference(tmp_path):
    """A checkpoint continues only the schedule and data order it was written for: a changed total or batch shape
    stops with the differences named, before any weight is loaded."""
    common = ["train.max_steps=4", "train.save_every=2", "train.stop_after=2"]
    align("sft", TINY, f"out_dir={tmp_path}", *common)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "align.cli",
            "sft",
            TINY,
            f"out_dir={tmp_path}",
            "resume=true",
            "train.max_steps=8",
            "train.micro_batch_size=1",
            "train.save_every=2",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot resume" in out.stderr and "total_steps 4 in the checkpoint, 8 now" in out.stderr
    assert "micro_batch_size 2 in the checkpoint, 1 now" in out.stderr
