"""PPO end to end on CPU with tiny models: the reward rises on held-out prompts with bounded KL, 2-process ZeRO-2/3
match one process, a killed run resumes exactly."""

import os
import subprocess
import sys

import pytest

from align.core.metrics import read_metrics
from align.core.records import write_jsonl_atomic
from align.world import ppo_task
from align.world.corpus import documents
from conftest import ROOT, kill_after_first_checkpoint

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
TINY = str(ROOT / "configs" / "ppo" / "tiny.yaml")


def align(*args, torchrun=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    out = subprocess.run(
        cmd + ["-m", "align.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SFT policy that is seldom enthusiastic, a reward model that likes enthusiasm, packed ptx rows."""
    d = tmp_path_factory.mktemp("ppo")
    write_jsonl_atomic(d / "sft.jsonl", ppo_task.sft_conversations(300, 0))
    write_jsonl_atomic(d / "rm.jsonl", ppo_task.enthusiasm_comparisons(600, 0))
    write_jsonl_atomic(d / "corpus.jsonl", documents(300, seed=0))
    align(
        "sft",
        str(ROOT / "configs/sft/tiny.yaml"),
        f"data.train={d / 'sft.jsonl'}",
        "train.max_steps=300",
        "train.save_every=0",
        f"out_dir={d / 'sft'}",
    )
    align(
        "rm",
        "train",
        str(ROOT / "configs/rm/tiny.yaml"),
        f"data.train={d / 'rm.jsonl'}",
        "train.epochs=3",
        f"out_dir={d / 'rm'}",
    )
    align(
        "data",
        "pack",
        "--input",
        str(d / "corpus.jsonl"),
        "--output",
        str(d / "packed"),
        "--tokenizer",
        "bytes",
        "--seq-len",
        "128",
    )
    return [f"models.policy={d / 'sft' / 'final'}", f"models.reward={d / 'rm' / 'final'}", f"data.ptx={d / 'packed'}"]


def metric(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.mark.slow
def test_ppo_raises_heldout_reward_with_bounded_kl(models, tmp_path):
    align("ppo", TINY, *models, f"out_dir={tmp_path}", "ppo.iterations=30")
    reward, std, kl = (metric(tmp_path, f"eval/{k}") for k in ("reward_mean", "reward_std", "kl"))
    n = 32 * 2  # held-out prompts x samples
    noise = max(std[0], std[30]) / n**0.5
    assert reward[30] - reward[0] > 5 * noise, (reward, std)
    assert kl[30] < 10.0  # nats per response, summed over its tokens
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert samples and (tmp_path / "final" / "policy" / "model.safetensors").exists()
    assert (tmp_path / "final" / "value" / "reward_head.safetensors").exists()
    rows = [r for r in read_metrics(tmp_path) if "train/reward/raw" in r]
    for key in (
        "train/kl",
        "train/entropy",
        "train/clipfrac",
        "train/approx_kl",
        "train/value_loss",
        "train/explained_variance",
        "train/ptx_loss",
        "train/response_length",
        "train/time/rollout_s",
        "train/time/experience_s",
        "train/time/train_s",
        "train/rollout_tokens_per_s",
        "train/reward/normalised",
        "train/engine_logprob_abs_diff",
    ):
        assert key in rows[-1], key
    assert rows[0]["train/policy_updated"] == 0.0 and rows[-1]["train/policy_updated"] == 1.0  # critic warm-up


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_matches_one_process(models, tmp_path, stage):
    """One minibatch per epoch, so both runs see the same batches and the same ptx rows: metrics agree within 5%
    (0.05 absolute below 1) over 3 iterations. Measured: rewards and value losses within 0.3%, the updated policy's
    KL within 0.03 nats (Adam turns reduction-order differences in tiny gradients into small weight differences)."""
    common = [*models, "ppo.iterations=3", "train.eval_every=0", "train.save_every=0", "ppo.critic_warmup_steps=1"]
    align("ppo", TINY, f"out_dir={tmp_path / 'one'}", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=16", *common)
    align(
        "ppo",
        TINY,
        f"out_dir={tmp_path / 'two'}",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=8",
        f"policy_deepspeed.zero_stage={stage}",
        f"value_deepspeed.zero_stage={stage}",
        *common,
        torchrun=True,
    )
    for key in ("train/reward/raw", "train/kl", "train/value_loss", "train/policy_loss", "train/ptx_loss"):
        one, two = metric(tmp_path / "one", key), metric(tmp_path / "two", key)
        assert sorted(one) == sorted(two) and len(one) >= 2, key
        assert all(abs(one[s] - two[s]) < 5e-2 * max(1.0, abs(one[s])) for s in one), (key, one, two)


@pytest.mark.slow
def test_killed_ppo_run_resumes_exactly(models, tmp_path):
    common = [*models, "ppo.iterations=12", "train.save_every=4", "train.eval_every=0"]
    align("ppo", TINY, f"out_dir={tmp_path / 'full'}", *common)
    run_dir = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(["ppo", TINY, f"out_dir={run_dir}", *common], run_dir, ENV)
    assert 4 <= killed_at < 12
    align("ppo", TINY, f"out_dir={run_dir}", "resume=true", *common)
    for key in ("train/reward/raw", "train/kl", "train/policy_loss", "train/value_loss", "train/kl_coef"):
        full, resumed = metric(tmp_path / "full", key), metric(run_dir, key)
        assert sorted(resumed) == sorted(full) and max(full) == 12
        assert all(abs(full[s] - resumed[s]) < 1e-5 for s in range(killed_at + 1, 13)), (key, full, resumed)


@pytest.mark.slow
def test_grpo_raises_heldout_reward_without_a_value_model(models, tmp_path):
    """GRPO with an extra reward function beside the reward model (a small bonus for "!"), logged per source."""
    bonus = tmp_path / "bonus.py"
    bonus.write_text("def bang(prompts, responses):\n    return [float('!' in r) for r in responses]\n")
    extra = f'ppo.extra_rewards=[{{kind: function, target: "{bonus}:bang", weight: 0.5}}]'
    align("ppo", TINY, *models, f"out_dir={tmp_path}", "ppo.iterations=20", "ppo.advantage=grpo",
          "ppo.critic_warmup_steps=0", "ppo.n_samples=4", "ppo.rollout_batch_size=4", "train.save_every=10",
          extra)  # fmt: skip
    reward, std = metric(tmp_path, "eval/reward_mean"), metric(tmp_path, "eval/reward_std")
    noise = max(std[0], std[20]) / (32 * 2) ** 0.5
    assert reward[20] - reward[0] > 5 * noise, (reward, std)
    rows = [r for r in read_metrics(tmp_path) if "train/reward/raw" in r]
    assert "train/policy_loss" in rows[-1] and "train/value_loss" not in rows[-1]
    for row in rows:  # the total is the model's score plus half the bonus
        assert row["train/reward/raw"] == pytest.approx(row["train/reward/model"] + 0.5 * row["train/reward/bang"])
    assert not (tmp_path / "final" / "value").exists()
    checkpoint = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "hf" / "policy").exists() and not (checkpoint / "hf" / "value").exists()
    assert (checkpoint / "state" / "policy").exists() and not (checkpoint / "state" / "value").exists()
