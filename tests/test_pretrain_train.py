"""Pretraining loop on CPU: the loss falls, 2-process ZeRO-2/3 follow one process, kill and resume, schedule."""

import math
import os
import subprocess
import sys

import pytest

from align.core.metrics import read_metrics
from align.core.records import write_jsonl_atomic
from align.core.schedule import lr_factor
from align.core.sections import OptimConfig
from align.world.corpus import documents
from base_model import QwenTokenizer
from base_model.pretrain.packing import pack
from conftest import ROOT, align_ok, kill_after_first_checkpoint

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    write_jsonl_atomic(folder / "corpus.jsonl", documents(300, seed=0))
    pack([folder / "corpus.jsonl"], folder / "rows", QwenTokenizer.from_bytes(), seq_len=128)
    return folder / "rows"


def align(*args, torchrun=False):
    """In this process, or as two processes under torchrun."""
    if not torchrun:
        return align_ok(*args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.cli", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_schedule_matches_its_formula():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    total = 110
    for step in range(total):
        if step < 10:
            expected = (step + 1) / 10
        else:
            progress = (step - 10) / 100
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_factor(step, total, cfg) == pytest.approx(expected)
    assert lr_factor(10, total, cfg) == pytest.approx(1.0)
    assert lr_factor(total, total, cfg) == pytest.approx(0.1)
    assert lr_factor(10**6, total, cfg) == pytest.approx(0.1)  # the floor holds past the end
    assert lr_factor(50, total, OptimConfig(lr=1.0, schedule="constant", warmup_steps=5)) == 1.0
    assert lr_factor(
        60, total, OptimConfig(lr=1.0, schedule="linear", warmup_steps=10, min_lr_ratio=0.0)
    ) == pytest.approx(0.5)


@pytest.mark.slow
def test_tiny_pretraining_lowers_the_loss_and_saves(packed, tmp_path):
    align("pretrain", TINY, f"data.train={packed}", f"out_dir={tmp_path}", "train.peak_tflops=0.1")
    curve = losses(tmp_path)
    evals = [r["eval/loss"] for r in read_metrics(tmp_path) if "eval/loss" in r]
    assert curve[max(curve)] < 0.6 * curve[min(curve)] and evals[-1] < evals[0]
    assert all("train/mfu" in r for r in read_metrics(tmp_path) if "train/loss" in r)
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_follows_single_process(packed, tmp_path, stage):
    """Same global batch: losses agree within 1e-4 over 10 steps."""
    common = [
        f"data.train={packed}",
        "train.max_steps=10",
        "train.log_every=1",
        "train.save_every=0",
        "train.eval_every=0",
        "data.eval_rows=0",
    ]
    align("pretrain", TINY, f"out_dir={tmp_path / 'one'}", *common)
    align(
        "pretrain",
        TINY,
        f"out_dir={tmp_path / 'two'}",
        f"deepspeed.zero_stage={stage}",
        "train.micro_batch_size=2",
        *common,
        torchrun=True,
    )
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4


@pytest.mark.slow
def test_killed_pretraining_resumes_exactly(packed, tmp_path):
    common = [
        f"data.train={packed}",
        "train.max_steps=40",
        "train.log_every=1",
        "train.save_every=5",
        "train.eval_every=0",
    ]
    align("pretrain", TINY, f"out_dir={tmp_path / 'full'}", *common)
    run_dir = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(["pretrain", TINY, f"out_dir={run_dir}", *common], run_dir, ENV)
    assert 5 <= killed_at < 40
    align("pretrain", TINY, f"out_dir={run_dir}", "resume=true", *common)
    full, resumed = losses(tmp_path / "full"), losses(run_dir)
    assert sorted(resumed) == list(range(1, 41))
    assert max(abs(full[s] - resumed[s]) for s in range(killed_at + 1, 41)) < 1e-6
