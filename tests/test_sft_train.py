"""The SFT recipe end to end on CPU: memorisation, generation, ZeRO-3 on 2 processes, kill and resume."""

import os
import subprocess
import sys
import time

import pytest

from align.core.metrics import read_metrics
from conftest import ROOT, align_here, align_ok, kill_after_first_checkpoint

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
TINY = str(ROOT / "configs" / "sft" / "tiny.yaml")


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.slow
def test_tiny_recipe_memorises_and_answers(tmp_path):
    align_ok("sft", TINY, f"out_dir={tmp_path}")
    curve = losses(tmp_path)
    assert curve[max(curve)] < 0.1, curve
    out = align_ok(
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
    align_ok("sft", TINY, f"out_dir={tmp_path / 'one'}", *common)
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
    align_ok("sft", TINY, f"out_dir={tmp_path / 'full'}", *common)
    run_dir = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(["sft", TINY, f"out_dir={run_dir}", *common], run_dir, ENV)
    assert 10 <= killed_at < 60, "the run was killed mid-way"
    align_ok("sft", TINY, f"out_dir={run_dir}", "resume=true", *common)
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
    align_ok("sft", TINY, f"out_dir={tmp_path}", *common)
    out = align_here(
        "sft",
        TINY,
        f"out_dir={tmp_path}",
        "resume=true",
        "train.max_steps=8",
        "train.micro_batch_size=1",
        "train.save_every=2",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot resume" in out.stderr and "total_steps 4 in the checkpoint, 8 now" in out.stderr
    assert "micro_batch_size 2 in the checkpoint, 1 now" in out.stderr


def write_two_stage_config(tmp_path, out_dir):
    """The tiny recipe in two stages (general chat, then the same data with another rate and the Qwen mask), with
    GSM8K and MBPP rows answered at every evaluation."""
    import yaml

    cfg = yaml.safe_load(open(TINY))
    cfg.update(out_dir=str(out_dir))
    cfg["data"]["train"] = str(ROOT / "examples/data/sft_tiny.jsonl")
    cfg["train"].update(max_steps=8, save_every=4, log_every=1, eval_every=4)
    cfg["eval"] = {"benchmarks": [
        {"name": "gsm8k", "data": str(ROOT / "tests/fixtures/public_rows/gsm8k_train_rows.jsonl"), "max_new_tokens": 8},
        {"name": "mbpp", "data": str(ROOT / "tests/fixtures/public_rows/mbpp_rows.jsonl"), "max_new_tokens": 8},
    ]}  # fmt: skip
    cfg["stages"] = [
        {"name": "general", "optim": {"lr": 3.0e-3}},
        {"name": "code", "data": {"mask_mode": "qwen"}, "optim": {"lr": 1.0e-3, "warmup_steps": 2}, "train": {"max_steps": 30, "save_every": 10}},
    ]  # fmt: skip
    path = tmp_path / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_two_stage_run_killed_in_its_second_stage_resumes_exactly(tmp_path):
    full_cfg = write_two_stage_config(tmp_path, tmp_path / "full")
    align_ok("sft", full_cfg)
    stage1, stage2 = tmp_path / "full/stages/1-general", tmp_path / "full/stages/2-code"
    assert sorted(losses(stage1)) == list(range(1, 9)) and sorted(losses(stage2)) == list(range(1, 31))
    import yaml

    resolved = yaml.safe_load((stage2 / "config.yaml").read_text())
    assert resolved["model"]["init"] == str(stage1 / "final") and resolved["data"]["mask_mode"] == "qwen"
    assert resolved["optim"]["lr"] == 1.0e-3 and resolved["train"]["save_every"] == 10
    assert (tmp_path / "full/final/model.safetensors").exists()  # links to the last stage's weights
    bench = [r for r in read_metrics(stage1) if "eval/bench/gsm8k" in r]
    assert [r["step"] for r in bench] == [0, 4, 8] and all("eval/bench/mbpp" in r for r in bench)

    killed_cfg = write_two_stage_config(tmp_path, tmp_path / "killed")
    killed_at = kill_after_first_checkpoint(["sft", killed_cfg], tmp_path / "killed/stages/2-code", ENV)
    assert 10 <= killed_at < 30
    stage1_rows = len(read_metrics(tmp_path / "killed/stages/1-general"))
    out = align_ok("sft", killed_cfg, "resume=true")
    assert "stage 1/2 'general': done, skipped" in out.stdout
    assert len(read_metrics(tmp_path / "killed/stages/1-general")) == stage1_rows  # not run again
    full, resumed = losses(stage2), losses(tmp_path / "killed/stages/2-code")
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert abs(full[step] - resumed[step]) < 1e-6, (step, full[step], resumed[step])


def test_a_bad_stage_is_named_before_anything_runs(tmp_path):
    from align.core.config import ConfigError, load_config
    from sft.train import SFTConfig, stage_configs

    cfg = load_config(SFTConfig, TINY, [f"out_dir={tmp_path}"])
    cfg.stages = [SFTConfig.model_fields["stages"].annotation.__args__[0](name="a", optim={"lr": "fast"})]
    with pytest.raises(ConfigError, match=r"stages\[0\] \(a\).*optim.lr"):
        stage_configs(cfg)


def test_models_only_checkpoints_hold_no_state_and_refuse_a_resume(tmp_path):
    """train.save_state=false: each checkpoint is the hf/ model alone (no DeepSpeed state, no RNG), and a resume
    from it stops naming the checkpoint instead of failing inside DeepSpeed."""
    common = ["train.max_steps=2", "train.save_every=1", "train.save_state=false"]
    align_ok("sft", TINY, f"out_dir={tmp_path}", *common)
    latest = tmp_path / "checkpoints" / "step-00000002"
    assert (latest / "hf" / "model.safetensors").exists()
    assert sorted(p.name for p in (latest / "state").iterdir()) == ["client_state.json"]
    out = align_here("sft", TINY, f"out_dir={tmp_path}", "resume=true", *common)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "step-00000002: holds the models only" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_steps_time_splits_into_the_engines_phases(tmp_path):
    """`align bench --device cuda sft` reports where the trainer's step goes (forward, backward, optimizer step,
    the rest); the split wraps the engine's own instance only for that step."""
    from align.bench import phase_split
    from align.core.config import load_config
    from sft import train as sft_train

    cfg = load_config(sft_train.SFTConfig, TINY, ["train.max_steps=2", "train.save_every=0", f"out_dir={tmp_path}"])
    run = sft_train.setup(cfg)
    run.engine.train()
    sft_train.train_step(run, 0)
    t0 = time.perf_counter()
    split = phase_split(run.engine, lambda: sft_train.train_step(run, 1))
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert set(split) == {"forward", "backward", "step", "other"}
    assert all(split[k] > 0 for k in ("forward", "backward", "step")), split
    assert 0 <= split["other"] and sum(split.values()) <= wall_ms + 1, (split, wall_ms)
    assert not {"forward", "backward", "step"} & set(vars(run.engine))  # the class's methods again
