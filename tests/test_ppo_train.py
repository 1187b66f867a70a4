"""PPO end to end on CPU with tiny models: the reward rises on held-out prompts with bounded KL, 2-process ZeRO-2/3
match one process, a killed run resumes exactly."""

import json
import os
import subprocess
import sys
import time

import pytest

from align.core.metrics import read_metrics
from align.core.records import write_jsonl_atomic
from align.world import ppo_task
from align.world.corpus import documents
from conftest import ROOT, align_ok, kill_after_first_checkpoint

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
TINY = str(ROOT / "configs" / "ppo" / "tiny.yaml")


def align(*args, torchrun=False):
    """In this process, or as two processes under torchrun."""
    if not torchrun:
        return align_ok(*args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "align.cli", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
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
    """One minibatch per epoch, so both runs see the same batches and the same ptx rows (the one process samples
    its rollouts in waves, the two in one batch each): metrics agree within 5%
    (0.05 absolute below 1) over 3 iterations. Measured: rewards and value losses within 0.3%, the updated policy's
    KL within 0.03 nats (Adam turns reduction-order differences in tiny gradients into small weight differences)."""
    common = [*models, "ppo.iterations=3", "train.eval_every=0", "train.save_every=0", "ppo.critic_warmup_steps=1"]
    # the one process samples its 16 rows in waves of at most 5 (per-row seeds: the same responses as in one batch)
    align("ppo", TINY, f"out_dir={tmp_path / 'one'}", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=16",
          "ppo.generate_batch_size=5", *common)  # fmt: skip
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
    assert set(metric(tmp_path / "one", "train/rollout_waves").values()) == {4.0}
    assert set(metric(tmp_path / "two", "train/rollout_waves").values()) == {1.0}  # the CPU's default: all rows
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
def test_grpo_raises_heldout_reward_without_a_value_model(models, tmp_path, judge_endpoint):
    """GRPO with an extra reward function beside the reward model (a small bonus for "!") and a second reward
    model at weight 0, logged per source; judged at every evaluation by a function, a held-out reward model and
    an LLM judge (a real HTTP server) against the SFT policy's answers."""
    bonus = tmp_path / "bonus.py"
    bonus.write_text("def bang(prompts, responses):\n    return [float('!' in r) for r in responses]\n")
    rm = next(m.split("=", 1)[1] for m in models if m.startswith("models.reward="))
    extra = (
        f'ppo.extra_rewards=[{{kind: function, target: "{bonus}:bang", weight: 0.5}}, '
        f'{{kind: model, target: "{rm}", name: rm2, weight: 0.0}}]'
    )
    judges = (
        f'eval.judges=[{{kind: function, target: "{bonus}:bang", name: gold}}, '
        f'{{kind: model, target: "{rm}", name: heldout}}, {{kind: llm, target: "{judge_endpoint}", name: pairwise}}]'
    )
    align("ppo", TINY, *models, f"out_dir={tmp_path}", "ppo.iterations=20", "ppo.advantage=grpo",
          "ppo.critic_warmup_steps=0", "ppo.n_samples=4", "ppo.rollout_batch_size=4", "train.save_every=10",
          extra, judges)  # fmt: skip
    reward, std = metric(tmp_path, "eval/reward_mean"), metric(tmp_path, "eval/reward_std")
    noise = max(std[0], std[20]) / (32 * 2) ** 0.5
    assert reward[20] - reward[0] > 5 * noise, (reward, std)
    rows = [r for r in read_metrics(tmp_path) if "train/reward/raw" in r]
    assert "train/policy_loss" in rows[-1] and "train/value_loss" not in rows[-1]
    for row in rows:  # the total is the model's score plus half the bonus; the second model is the same one
        assert row["train/reward/raw"] == pytest.approx(row["train/reward/model"] + 0.5 * row["train/reward/bang"])
        assert row["train/reward/rm2"] == pytest.approx(row["train/reward/model"], abs=1e-4)
    assert not (tmp_path / "final" / "value").exists()
    checkpoint = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "hf" / "policy").exists() and not (checkpoint / "hf" / "value").exists()
    assert (checkpoint / "state" / "policy").exists() and not (checkpoint / "state" / "value").exists()

    # the judges, at every evaluation (steps 0, 10, 20)
    evals = {r["step"]: r for r in read_metrics(tmp_path) if "eval/judge/gold" in r}
    assert sorted(evals) == [0, 10, 20]
    samples = [json.loads(l) for l in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    for step, row in evals.items():
        mine = [s for s in samples if s["step"] == step]
        assert row["eval/judge/gold"] == pytest.approx(sum(s["judges"]["gold"] for s in mine) / len(mine))
        assert row["eval/judge/gold"] == pytest.approx(sum("!" in s["response"] for s in mine) / len(mine))
        assert row["eval/judge/pairwise/consistency"] == 1.0 and row["eval/judge/pairwise/invalid"] == 0.0
        assert "eval/hacking_warning" in row
    assert evals[0]["eval/judge/pairwise"] == 0.5  # at step 0 the policy is the SFT policy: ties throughout
    assert evals[20]["eval/judge/gold"] > evals[0]["eval/judge/gold"]  # more "!" after training on the bonus
    assert evals[20]["eval/judge/pairwise"] > 0.5  # the fake judge prefers answers with more "!"
    references = json.loads((tmp_path / "judge_references.json").read_text())
    assert references == [s["response"] for s in samples if s["step"] == 0]
    assert evals[20]["eval/judge/heldout"] == pytest.approx(
        sum(s["judges"]["heldout"] for s in samples if s["step"] == 20) / 64
    )
    align("report", str(tmp_path))  # any run's report: proxy against gold, KL frontiers
    page = (tmp_path / "report.html").read_text()
    assert "Proxy and gold" in page and "No reward hacking flagged" in page


@pytest.mark.slow
def test_sweep_over_a_ppo_config_runs_in_parallel_and_resumes_after_a_kill(models, tmp_path):
    """4 trials (PPO and GRPO x two KL coefficients) of a PPO config made here, 2 at a time, ranked by a gold
    judge; the sweep process is killed once a trial has finished and another has a checkpoint: its runs die with
    it, and the restarted sweep resumes the killed trials from their checkpoints and runs no trial twice."""
    import optuna
    import yaml

    base = yaml.safe_load(open(TINY))
    for item in models:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        base[section][field] = value
    bonus = tmp_path / "bonus.py"
    bonus.write_text("def bang(prompts, responses):\n    return [float('!' in r) for r in responses]\n")
    base["eval"] = {"judges": [{"kind": "function", "target": f"{bonus}:bang", "name": "gold"}]}
    base["ppo"].update(iterations=4, critic_warmup_steps=0, rollout_batch_size=4, n_samples=2, mini_batch_size=8)
    base["train"].update(eval_every=2, save_every=2)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    out = tmp_path / "sweep"
    sweep = {
        "base": str(tmp_path / "base.yaml"),
        "stage": "ppo",
        "method": "grid",
        "parameters": {"ppo.advantage": ["gae", "grpo"], "ppo.kl_coef": [0.05, 0.5]},
        "parallel": 2,
        "out_dir": str(out),
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cmd = [sys.executable, "-m", "align.cli", "sweep", str(tmp_path / "sweep.yaml")]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            finished = list(out.glob("trial-*/result.json"))
            checkpointed = [p for p in out.glob("trial-*/run/checkpoints/latest.json")
                            if not (p.parents[2] / "result.json").exists()]  # fmt: skip
            if finished and checkpointed:
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        proc.kill()  # the sweep process alone: its runs must die with it
        proc.wait()
    first = (tmp_path / "first.log").read_text()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trial-*/result.json")}
    interrupted = [p.parent.name for p in out.glob("trial-*/pid") if p.parent.name not in done_before]
    with_checkpoint = {p.parents[2].name for p in out.glob("trial-*/run/checkpoints/latest.json")} - set(done_before)
    assert with_checkpoint
    assert done_before and interrupted, first
    first_lines = first.splitlines()
    started = [l for l in first_lines if "] started trial-" in l]
    # the kill can land between a trial's result.json and its "finished" line
    finished_at = next((i for i, l in enumerate(first_lines) if "] finished trial-" in l), len(first_lines))
    assert sum(1 for l in first_lines[:finished_at] if "] started trial-" in l) == 2  # two at once
    for name in interrupted:  # died with the sweep (SIGTERM from the kernel)
        pid = int((out / name / "pid").read_text())
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read():
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{name}'s run (pid {pid}) outlived the sweep")

    second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for name in done_before:  # not run again
        assert f"started {name}" not in second.stdout and f"resumed {name}" not in second.stdout
        assert (out / name / "result.json").stat().st_mtime_ns == done_before[name]
    for name in interrupted:  # resumed (from its checkpoint where it had one), not started again
        assert f"resumed {name}" in second.stdout
        assert ("resumed from" in (out / name / "log.txt").read_text()) == (name in with_checkpoint)
        steps = [r["step"] for r in read_metrics(out / name / "run") if "train/kl" in r]
        assert steps == [1, 2, 3, 4], steps
    first_started = {l.split("started ")[1].split()[0] for l in started}
    assert not any(f"started {name}" in second.stdout for name in first_started)

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    trials = [t for t in study.get_trials() if not t.user_attrs.get("abandoned")]  # see test_sweep.py
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {(t.params["ppo.advantage"], t.params["ppo.kl_coef"]) for t in trials} == {
        (a, k) for a in ("gae", "grpo") for k in (0.05, 0.5)
    }
    results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    values = [r["value"] for r in results]
    assert values == sorted(values, reverse=True)
    for r in results:  # the value is the gold judge at the last evaluation, its interval from the answers
        assert r["value"] == metric(out / r["run"] / "run", "eval/judge/gold")[4]
        assert r["ci95"][0] <= r["value"] <= r["ci95"][1] and r["n"] == 64
        assert r["method"] == {"gae": "ppo", "grpo": "grpo"}[r["ppo.advantage"]]
        assert f"kl_coef: {r['ppo.kl_coef']}" in (out / r["run"] / "config.yaml").read_text()
    page = (out / "report.html").read_text()
    assert "KL–gold frontier" in page and "KL–reward frontier" in page and page.count("trial-00") >= 4
