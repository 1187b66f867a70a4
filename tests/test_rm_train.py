"""Reward-model training end to end on CPU: accuracy on a content-decided task, ZeRO on 2 processes, resume."""

import json
import os
import subprocess
import sys

import pytest

from align.core.metrics import read_metrics
from align.core.records import DataError, write_jsonl_atomic
from align.world.preferences import translation_comparisons
from conftest import ROOT, align_ok, kill_after_first_checkpoint

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
TINY = str(ROOT / "configs" / "rm" / "tiny.yaml")


def curve(run_dir, key="train/loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.mark.slow
def test_tiny_reward_model_learns_content_not_length(tmp_path):
    """Comparison records (the labelling export format) → ≥ 0.9 held-out accuracy; length alone ≈ 0.5. Eight of
    the recipe's ten epochs: it separates the pairs from about the fifth (0.98 held out after eight, 0.98 after
    ten)."""
    align_ok("rm", "train", TINY, f"out_dir={tmp_path / 'rm'}", "train.epochs=8")
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl_atomic(heldout, translation_comparisons(400, seed=12345))
    out = align_ok("rm", "eval", "--model", str(tmp_path / "rm" / "final"), "--data", str(heldout), "--json")
    metrics = json.loads(out.stdout[out.stdout.index("{") :])
    assert metrics["overall"]["accuracy"] >= 0.9, metrics["overall"]
    assert abs(metrics["length_baseline"]["accuracy"] - 0.5) < 0.08
    assert (tmp_path / "rm" / "final" / "eval_report.html").exists()
    scored = tmp_path / "scored.jsonl"
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"prompt": "Translate 'cat' into Chinese.", "response": "cat = 猫"})
        + "\n"
        + json.dumps({"prompt": "Translate 'cat' into Chinese.", "response": "cat = 狗"})
        + "\n"
    )
    align_ok(
        "rm",
        "score",
        "--model",
        str(tmp_path / "rm" / "final"),
        "--data",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(scored),
    )
    right, wrong = [json.loads(l)["reward"] for l in scored.read_text().splitlines()]
    assert right > wrong


def test_finetuning_draws_a_tag_balanced_sample(tmp_path):
    from align.core.config import load_config
    from base_model import QwenTokenizer
    from rm.data import encode_pairs, load_pairs
    from rm.tags.sampler import sample, tag_matrix
    from rm.train import RMConfig, setup

    cfg = load_config(
        RMConfig, TINY, [f"out_dir={tmp_path}", "data.balance_n=200", "data.eval_fraction=0", "train.max_steps=1"]
    )
    run = setup(cfg)
    pairs, _ = load_pairs(str(ROOT / "examples/data/rm_tiny.jsonl"))
    m, _ = tag_matrix([p.tags for p in pairs])
    picked = sample(m, 200, "capped", 0)
    tok = QwenTokenizer.from_bytes()
    assert run.train_pairs == encode_pairs([pairs[i] for i in picked], tok, 128, tok.eod_id)[0]
    per_tag = sorted(int(c) for c in m[picked].sum(0).A1 if c)
    assert per_tag[-1] <= 2 * per_tag[0] + 2  # 24 words, about 8 pairs each


def test_training_on_hh_rows_leaves_out_and_names_those_that_part_early(tmp_path, capsys):
    from align.core.config import load_config
    from rm.train import RMConfig, setup

    public = ROOT / "tests" / "fixtures" / "public_rows"
    data = tmp_path / "hh.jsonl"
    data.write_text(
        (public / "hh_rlhf_harmless_test_sample.jsonl").read_text()
        + (public / "hh_rlhf_harmless_test_divergent.jsonl").read_text()
    )
    overrides = [f"out_dir={tmp_path / 'rm'}", f"data.train={data}", "data.eval_fraction=0", "train.micro_batch_size=2"]
    run = setup(load_config(RMConfig, TINY, overrides))
    assert len(run.train_pairs) == 4
    out = capsys.readouterr().out
    assert "left out 5 multi-turn replies" in out and f"{data}:5: 'chosen' and 'rejected' part" in out
    with pytest.raises(DataError, match="hh.jsonl:5"):
        setup(load_config(RMConfig, TINY, [*overrides, "data.on_error=raise"]))


@pytest.mark.slow
def test_zero2_two_processes_follow_single_process(tmp_path):
    common = ["train.max_steps=8", "train.log_every=1", "data.eval_fraction=0", "loss.lm_coef=0.5"]
    align_ok("rm", "train", TINY, f"out_dir={tmp_path / 'one'}", *common)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.cli"]
    out = subprocess.run(
        torchrun
        + [
            "rm",
            "train",
            TINY,
            f"out_dir={tmp_path / 'two'}",
            "deepspeed.zero_stage=2",
            "train.micro_batch_size=8",
            *common,
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 9))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4


@pytest.mark.slow
def test_killed_reward_model_run_resumes_exactly(tmp_path):
    common = ["train.max_steps=40", "train.log_every=1", "train.save_every=5", "data.eval_fraction=0"]
    align_ok("rm", "train", TINY, f"out_dir={tmp_path / 'full'}", *common)
    run_dir = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(["rm", "train", TINY, f"out_dir={run_dir}", *common], run_dir, ENV)
    assert 5 <= killed_at < 40
    align_ok("rm", "train", TINY, f"out_dir={run_dir}", "resume=true", *common)
    full, resumed = curve(tmp_path / "full"), curve(run_dir)
    assert sorted(resumed) == list(range(1, 41))
    assert max(abs(full[s] - resumed[s]) for s in range(killed_at + 1, 41)) < 1e-6


def test_language_model_term_is_the_mean_over_the_chosen_responses_tokens(tmp_path, monkeypatch):
    """lm_loss (and the lm_coef term) divides the chosen rows' summed token loss by the chosen rows' target
    tokens, not by the targets of chosen and rejected rows together."""
    import torch

    from align.core.config import load_config
    from align.core.losses import count_targets, summed_token_loss
    from rm import train as rm_train
    from rm.data import collate_pairs

    monkeypatch.chdir(ROOT)
    cfg = load_config(
        rm_train.RMConfig,
        TINY,
        [
            "train.max_steps=1",
            "train.micro_batch_size=4",
            "train.grad_accum=2",
            f"out_dir={tmp_path}",
            "train.peak_tflops=1",
        ],
    )
    run = rm_train.setup(cfg)
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for i in range(2):
            batch = collate_pairs(run.batches.get(i), run.tokenizer.pad_id)
            b = batch["strength"].shape[0]
            labels = torch.where(batch["response_mask"][:b].bool(), batch["input_ids"][:b], -100)
            hidden, _ = run.engine.module.lm.model(batch["input_ids"][:b], attention_mask=batch["attention_mask"][:b])
            loss_sum += summed_token_loss(run.engine.module.lm.lm_head(hidden), labels).item()
            targets += count_targets(labels)
    metrics = rm_train.train_step(run, 0)
    assert abs(metrics["lm_loss"] - loss_sum / targets) < 1e-4 * loss_sum / targets


@pytest.mark.slow
def test_zero3_builds_the_reward_model_in_partitions(tmp_path):
    """Under ZeRO-3 the reward model is built straight into partitions, fresh and from a reward-model folder
    (`init`): the losses follow the whole model's (ZeRO-0)."""
    common = ["train.max_steps=4", "train.log_every=1", "data.eval_fraction=0"]
    align_ok("rm", "train", TINY, f"out_dir={tmp_path / 'whole'}", *common)
    align_ok("rm", "train", TINY, f"out_dir={tmp_path / 'parts'}", "deepspeed.zero_stage=3", *common)
    whole, parts = curve(tmp_path / "whole"), curve(tmp_path / "parts")
    assert sorted(whole) == sorted(parts) == [1, 2, 3, 4]
    assert max(abs(whole[s] - parts[s]) for s in whole) < 1e-5
    init = f"init={tmp_path / 'whole' / 'final'}"
    align_ok("rm", "train", TINY, f"out_dir={tmp_path / 'ft-whole'}", init, *common)
    align_ok("rm", "train", TINY, f"out_dir={tmp_path / 'ft-parts'}", init, "deepspeed.zero_stage=3", *common)
    whole, parts = curve(tmp_path / "ft-whole"), curve(tmp_path / "ft-parts")
    assert max(abs(whole[s] - parts[s]) for s in whole) < 1e-5
    assert whole[1] < curve(tmp_path / "whole")[1]  # it started from the trained model, not a fresh one
