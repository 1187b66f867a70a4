"""PPO with four models (policy, value, reference, reward) and pretraining gradients mixed in:
`align ppo CONFIG [key=value …]`.

One iteration: sample `n_samples` responses per prompt with the rollout engine → score them with the reward
model (normalised by running moments) → recompute policy, reference and value estimates → KL-penalised token
rewards → GAE → PPO epochs over minibatches (the value model alone for the first `critic_warmup_steps`), the policy
loss plus `ptx_coef` x a language-model loss on packed pretraining rows → send the new weights to the engine.

With `ppo.advantage` grpo, rloo or reinforce_pp no value model is built: the advantages come from the other
responses to the same prompt (grpo, rloo) or from the batch's returns (reinforce_pp), and the same clipped policy
loss, KL, ptx and resume machinery runs on them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from align.core import distributed
from align.core.batching import MicroBatches
from align.core.checkpointing import TrainingState, open_run, save_checkpoint
from align.core.engine import TrainEngine
from align.core.losses import count_targets, normalised_loss
from align.core.metrics import MetricsLogger, Throughput, read_metrics, tokens_per_second
from align.core.modeling import load_trained, save_from_engine
from align.core.records import DataError
from align.eval.generation import read_prompts, truncate_eval_samples, write_eval_samples
from align.eval.harness import benchmark_counts, benchmark_metrics, benchmark_prompts
from align.eval.judges import Judges, hacking_warning, judge_metrics
from base_model import QwenTokenizer, load_pretrained
from base_model.atomic import write_json_atomic
from base_model.generate import SamplingParams
from base_model.pretrain.packing import PackedDataset, split_rows
from ppo.config import PPOConfig
from ppo.experience import (
    Experience,
    RunningMoments,
    build_sequences,
    response_text,
    reward_scores,
    sequence_logprobs,
    sequence_values,
)
from ppo.kl_control import AdaptiveKLController, FixedKLController
from ppo.losses import (
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    kl_penalised_rewards,
    masked_moments,
    masked_sum,
    masked_whiten,
    policy_loss,
    value_loss,
)
from ppo.models import (
    ValueModel,
    bucket_bytes,
    check_sync,
    frozen_dtype,
    make_rollout_engine,
    resident,
    sync_rollout_weights,
)
from ppo.rewards import extra_rewards, make_scorers
from rm.model import load_reward_model, load_trained_reward_model, save_reward_state


@dataclass
class Run:
    cfg: PPOConfig
    actor: TrainEngine
    critic: TrainEngine | None  # None for the critic-free estimators
    ref_policy: torch.nn.Module
    reward_model: torch.nn.Module
    tokenizer: QwenTokenizer
    rm_tokenizer: QwenTokenizer
    rollout: object
    prompts: list
    eval_prompts: list
    batches: MicroBatches
    ptx: PackedDataset | None
    ptx_train: list[int]
    ptx_eval: list[int]
    kl_ctl: object
    moments: RunningMoments
    state: TrainingState  # as resumed; `state.step` is where this run starts
    logger: MetricsLogger
    out_dir: Path
    nan_streak: int = 0
    syncs: int = 0  # weight syncs to the rollout engine in this process
    throughput: Throughput | None = None
    scorers: list = field(default_factory=list)  # (RewardSource, scorer) of ppo.extra_rewards
    judges: Judges | None = None  # eval.judges
    eval_history: list = field(default_factory=list)  # (step, proxy, gold) of every evaluation with a gold judge
    bench_prompts: list = field(default_factory=list)  # (benchmark, item, prompt ids) of eval.benchmarks


def setup(cfg: PPOConfig) -> Run:
    distributed.init()
    p = cfg.ppo
    torch.manual_seed(cfg.train.seed)
    dev, frozen = distributed.device(), frozen_dtype(cfg)
    home = torch.device("cpu") if cfg.models.offload_frozen else dev  # where the frozen models wait
    policy = load_trained(cfg.models.policy, cfg.policy_deepspeed, dev).train()  # ZeRO-3: never whole on a rank
    tokenizer = QwenTokenizer.from_file(cfg.models.policy)
    ref_policy = load_pretrained(cfg.models.policy, dtype=frozen, device=home).eval()
    reward_model = load_reward_model(cfg.models.reward, dtype=frozen, device=home).eval()
    rm_tokenizer = QwenTokenizer.from_file(cfg.models.reward)
    critic_free = p.advantage != "gae"
    if critic_free and (p.critic_warmup_steps or (p.advantage in ("grpo", "rloo") and p.n_samples < 2)):
        raise DataError(
            f"ppo.advantage={p.advantage} needs no critic warm-up (critic_warmup_steps: 0)"
            + (" and n_samples >= 2 (its baseline is the other responses to the prompt)" if p.n_samples < 2 else "")
        )
    value_model = None
    if not critic_free:
        value_source = cfg.models.value or cfg.models.reward
        value_model = ValueModel(load_trained_reward_model(value_source, cfg.value_deepspeed, dev))
    elif distributed.rank() == 0:
        n_params = sum(t.numel() for t in reward_model.parameters())
        print(
            f"[ppo] advantage={p.advantage}: no value model built ({n_params / 1e6:.1f}M parameters, "
            f"{n_params * 16 / 2**30:.2f} GiB of fp32 weights, gradients and Adam states not allocated)"
        )
    for module in (ref_policy, reward_model):
        module.requires_grad_(False)

    scorers = make_scorers(p.extra_rewards, device=home, dtype=frozen)
    judges = Judges(cfg.eval, device=home, dtype=frozen)
    if judges and not cfg.data.eval_prompts:
        raise DataError("eval.judges score the answers to data.eval_prompts: set data.eval_prompts")
    prompts = read_prompts(cfg.data.prompts, tokenizer, cfg.data.max_prompt_len)
    eval_prompts = (
        read_prompts(cfg.data.eval_prompts, tokenizer, cfg.data.max_prompt_len) if cfg.data.eval_prompts else []
    )
    batches = MicroBatches(prompts, p.rollout_batch_size, distributed.rank(), distributed.world_size(), cfg.train.seed)
    rollouts_per_rank = p.rollout_batch_size * p.n_samples
    if rollouts_per_rank % p.mini_batch_size or p.mini_batch_size % cfg.train.micro_batch_size:
        raise DataError(
            f"ppo.mini_batch_size ({p.mini_batch_size}) must divide rollout_batch_size x n_samples "
            f"({rollouts_per_rank}) and be a multiple of train.micro_batch_size "
            f"({cfg.train.micro_batch_size})"
        )
    accum = p.mini_batch_size // cfg.train.micro_batch_size
    updates = p.iterations * p.ppo_epochs * (rollouts_per_rank // p.mini_batch_size)
    actor = TrainEngine(policy, cfg.policy_optim, cfg.policy_deepspeed, updates, cfg.train.micro_batch_size, accum)
    critic = None
    if value_model is not None:
        critic = TrainEngine(
            value_model, cfg.value_optim, cfg.value_deepspeed, updates, cfg.train.micro_batch_size, accum
        )
    ptx, ptx_train, ptx_eval = None, [], []
    if cfg.data.ptx:
        ptx = PackedDataset(cfg.data.ptx)
        ptx_train, ptx_eval = split_rows(len(ptx), cfg.data.ptx_eval_rows, cfg.train.seed)
    kl_ctl = AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target else FixedKLController(p.kl_coef)
    moments = RunningMoments()
    out_dir = Path(cfg.out_dir)
    fresh = TrainingState.start(p.iterations, cfg.train.micro_batch_size, accum, cfg.train.seed)
    state, logger = open_run(cfg, out_dir, engines(actor, critic), "ppo", fresh)
    if state.step:
        truncate_eval_samples(out_dir, state.step)
        kl_ctl.load_state_dict(state.extra["kl_ctl"])
        moments.load_state_dict(state.extra["reward_moments"])
    rollout = make_rollout_engine(cfg, actor, tokenizer)
    throughput = Throughput.measured(0.0, cfg.train.peak_tflops, cfg.policy_deepspeed.bf16)  # FLOPs per update
    if state.step and cfg.ppo.engine == "vllm":
        rollout.load_weights(actor.gathered_parameters(to_cpu=False, bucket_bytes=bucket_bytes(cfg)))
    return Run(
        cfg,
        actor,
        critic,
        ref_policy,
        reward_model,
        tokenizer,
        rm_tokenizer,
        rollout,
        prompts,
        eval_prompts,
        batches,
        ptx,
        ptx_train,
        ptx_eval,
        kl_ctl,
        moments,
        state,
        logger,
        out_dir,
        throughput=throughput,
        scorers=scorers,
        judges=judges,
        eval_history=gold_history(out_dir, cfg.eval.gold_name()) if state.step else [],
        bench_prompts=benchmark_prompts(cfg.eval.benchmarks, tokenizer),
    )


def engines(actor: TrainEngine, critic: TrainEngine | None) -> dict[str, TrainEngine]:
    """The trained models a checkpoint holds."""
    return {"policy": actor} | ({"value": critic} if critic is not None else {})


def sampling_for(run: Run, rows: list, step: int, n: int) -> SamplingParams:
    """Each response gets its own seed from (seed, step, prompt index, sample), whatever the world size."""
    p = run.cfg.ppo
    seeds = [hash((run.cfg.train.seed, step, idx, k)) % (2**62) for idx, _, _ in rows for k in range(n)]
    return SamplingParams(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop_token_ids=(run.tokenizer.im_end_id, run.tokenizer.eod_id),
        row_seeds=seeds,
        vocab_limit=len(run.tokenizer),
    )


def experience_batch(cfg: PPOConfig) -> int:
    """Rows per forward pass when scoring rollouts: no gradients are kept, so more than a training micro-batch."""
    return cfg.ppo.experience_batch_size or 4 * cfg.train.micro_batch_size


def make_experience(run: Run, step: int) -> tuple[Experience, dict, list]:
    cfg, p = run.cfg, run.cfg.ppo
    rows = run.batches.get(step)
    t0 = time.perf_counter()
    prompt_list = [ids for _, _, ids in rows for _ in range(p.n_samples)]
    rollouts = run.rollout.generate(prompt_list, sampling_for(run, rows, step, p.n_samples))
    t1 = time.perf_counter()
    dev = distributed.device()
    input_ids, attention_mask, mask, engine_logprobs = build_sequences(prompt_list, rollouts, run.tokenizer.pad_id)
    input_ids, attention_mask, mask = input_ids.to(dev), attention_mask.to(dev), mask.to(dev)
    mb = experience_batch(cfg)
    run.actor.eval()
    offload = cfg.models.offload_frozen
    old_logprobs = sequence_logprobs(run.actor.forward, input_ids, attention_mask, mb)
    with resident(run.ref_policy, offload) as ref_policy:
        ref_logprobs = sequence_logprobs(ref_policy, input_ids, attention_mask, mb)
    values = torch.zeros_like(old_logprobs)  # (B, T); the critic-free estimators have no baseline per token
    if run.critic is not None:
        run.critic.eval()
        values = sequence_values(run.critic.forward, input_ids, attention_mask, mb)
        run.critic.train()
    run.actor.train()
    messages = [m for _, m, _ in rows for _ in range(p.n_samples)]
    texts = [response_text(run.tokenizer, r) for r in rollouts]
    raw, by_source = total_reward(run, messages, texts, mb)

    n, mean, var = (float(m) for m in masked_moments(raw, torch.ones_like(raw), distributed.all_reduce))
    run.moments.update(n, mean, var * (n - 1))  # this batch's count, mean and sum of squared deviations
    scores = (raw - run.moments.mean) / max(run.moments.std, 1e-6) if p.normalize_reward else raw.clone()
    if p.reward_clip is not None:
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
    ended = torch.tensor([r.finish_reason == "stop" for r in rollouts], device=dev)
    scores = scores + (~ended).float() * p.no_eos_penalty

    kl_coef = run.kl_ctl.value if p.kl_in_reward else 0.0
    rewards, kl = kl_penalised_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, p.kl_estimator)
    advantages, returns = estimate_advantages(p, rewards, values, mask)
    exp = Experience(input_ids, attention_mask, mask, old_logprobs, ref_logprobs, values, rewards, advantages, returns)
    t2 = time.perf_counter()

    sums = distributed.all_reduce_sums(
        {
            "raw": raw.sum(),
            "scores": scores.sum(),
            "kl": masked_sum(kl_estimate(old_logprobs, ref_logprobs, "k1"), mask),
            "tokens": mask.sum(),
            "ended": ended.sum(),
            "rows": len(raw),
            "engine_diff": masked_sum((old_logprobs - engine_logprobs.to(dev)).abs(), mask),
            **{f"source/{k}": v.sum() for k, v in by_source.items()},
        }
    )
    n_rows, n_tokens = sums["rows"], sums["tokens"]
    metrics = {
        "reward/raw": sums["raw"] / n_rows,
        "reward/normalised": sums["scores"] / n_rows,
        "kl": sums["kl"] / n_rows,
        "kl_coef": run.kl_ctl.value,
        "response_length": n_tokens / n_rows,
        "ended_fraction": sums["ended"] / n_rows,
        "engine_logprob_abs_diff": sums["engine_diff"] / max(n_tokens, 1),
        "time/rollout_s": t1 - t0,
        "time/experience_s": t2 - t1,
        "rollout_tokens_per_s": tokens_per_second(n_tokens, t1 - t0),
        **({"rollout_waves": float(run.rollout.waves)} if hasattr(run.rollout, "waves") else {}),  # native engine
        **{f"reward/{k}": sums[f"source/{k}"] / n_rows for k in by_source},
    }  # response tokens, all ranks
    samples = [{"prompt": m, "response": t, "reward": float(r)} for m, t, r in zip(messages, texts, raw)]
    return exp, metrics, samples


def total_reward(
    run: Run, messages: list, texts: list[str], batch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward of each response (B,): models.reward_weight x the reward model's score plus each extra source's
    weight x its score; and, with extra sources, each source's unweighted scores by name (the reward model's as
    `model`)."""
    dev, cfg = distributed.device(), run.cfg
    with resident(run.reward_model, cfg.models.offload_frozen) as reward_model:
        model_scores = reward_scores(reward_model, run.rm_tokenizer, messages, texts, batch_size, 4096).to(dev)
    total = cfg.models.reward_weight * model_scores
    if not run.scorers:
        return total, {}
    by_source = {"model": model_scores}
    for name, scores in extra_rewards(run.scorers, messages, texts).items():
        by_source[name] = torch.tensor(scores, device=dev, dtype=total.dtype)
    for source, _ in run.scorers:
        total = total + source.weight * by_source[source.label()]
    return total, by_source


def estimate_advantages(p, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """(advantages, returns), both (B, T), by `p.advantage`; rewards are the KL-penalised token rewards."""
    if p.advantage in ("grpo", "rloo"):  # one advantage per response, from its sequence reward
        sequence_rewards = rewards.sum(-1)  # (B,): the score minus the KL penalties
        advantages = group_advantages(sequence_rewards, p.n_samples, p.advantage)[:, None] * mask.to(rewards.dtype)
        if p.advantage == "rloo" and p.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_reduce=distributed.all_reduce)
        return advantages, advantages
    lam = 1.0 if p.advantage == "reinforce_pp" else p.lam  # REINFORCE++: returns, no critic baseline
    advantages, returns = gae(rewards, values, mask, p.gamma, lam)
    if p.whiten_advantages or p.advantage == "reinforce_pp":
        advantages = masked_whiten(advantages, mask, all_reduce=distributed.all_reduce)
    return advantages, returns


def actor_loss(run: Run, mb: Experience, global_tokens: int, ptx_batch: dict | None, global_ptx: int):
    p = run.cfg.ppo
    out = run.actor.forward(mb.input_ids, attention_mask=mb.attention_mask, token_logprobs=True, entropy=True)
    logprobs, entropy = out.token_logprobs, out.entropy  # (B, T) each, without (B, T, V) logits
    per_token, clipped, approx_kl = policy_loss(logprobs, mb.old_logprobs, mb.advantages, p.clip_range)
    mask = mb.response_mask
    loss = normalised_loss(masked_sum(per_token, mask), global_tokens)
    stats = {
        "policy_loss": masked_sum(per_token.detach(), mask),
        "clipfrac": masked_sum(clipped, mask),
        "approx_kl": masked_sum(approx_kl.detach(), mask),
    }  # sums on the device; read once per update
    stats["entropy"] = masked_sum(entropy.detach(), mask)
    if p.entropy_coef:
        loss = loss - p.entropy_coef * normalised_loss(masked_sum(entropy, mask), global_tokens)
    if not p.kl_in_reward:
        loss = loss + run.kl_ctl.value * normalised_loss(
            masked_sum(kl_estimate(logprobs, mb.ref_logprobs, "k3"), mask), global_tokens
        )
    if ptx_batch is not None:
        ptx_sum = run.actor.forward(
            ptx_batch["input_ids"], position_ids=ptx_batch["position_ids"], labels=ptx_batch["labels"]
        ).loss_sum
        loss = loss + p.ptx_coef * normalised_loss(ptx_sum, global_ptx)
        stats["ptx_loss"] = ptx_sum.detach()
    return loss, stats


def critic_loss(run: Run, mb: Experience, global_tokens: int):
    values = run.critic.forward(mb.input_ids, mb.attention_mask).float()[:, :-1]
    per_token, clipped = value_loss(values, mb.values, mb.returns, run.cfg.ppo.clip_range_value)
    mask = mb.response_mask
    return normalised_loss(masked_sum(per_token, mask), global_tokens), {
        "value_loss": masked_sum(per_token.detach(), mask),
        "value_clipfrac": masked_sum(clipped, mask),
    }


def any_rank_nonfinite(losses: list[torch.Tensor]) -> bool:
    """True when a loss is not finite on any rank (the micro-batch's one host synchronisation)."""
    local = sum(float(not ok) for ok in torch.stack([l.detach() for l in losses]).isfinite().tolist())
    return distributed.all_reduce_sum([local])[0] > 0


def ppo_update(run: Run, exp: Experience, step: int, train_actor: bool) -> dict[str, float]:
    """PPO epochs over minibatches; returns sums over every rank, divided into means."""
    cfg, p = run.cfg, run.cfg.ppo
    n, mb_size, micro = len(exp.input_ids), p.mini_batch_size, cfg.train.micro_batch_size
    sums: dict[str, torch.Tensor] = {}
    tokens_total = ptx_tokens_total = ptx_rows_tokens = 0.0
    skipped = 0
    g = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    lengths = exp.attention_mask.sum(-1).tolist()  # a micro-batch leaves out the padding past its longest row
    for epoch in range(p.ppo_epochs):
        order = torch.randperm(n, generator=g).tolist()
        for start in range(0, n, mb_size):
            # micro-batches of rows of similar length (the same optimizer step whatever their order): less padding
            minibatch = sorted(order[start : start + mb_size], key=lambda i: -lengths[i])
            micros = [minibatch[i : i + micro] for i in range(0, len(minibatch), micro)]
            global_tokens = int(distributed.all_reduce_sum([float(exp.response_mask[minibatch].sum())])[0])
            ptx_batches = [None] * len(micros)
            global_ptx = 0
            if train_actor and run.ptx is not None and p.ptx_coef > 0:
                # draw the whole step's rows with the shared generator; this rank takes its slice, so the rows
                # used do not depend on the number of ranks
                world, r = distributed.world_size(), distributed.rank()
                draw = torch.randint(len(run.ptx_train), (world * len(micros), p.ptx_batch_size), generator=g)
                mine = draw[r * len(micros) : (r + 1) * len(micros)].tolist()
                ptx_batches = [
                    {k: v.to(distributed.device()) for k, v in run.ptx.batch([run.ptx_train[i] for i in d]).items()}
                    for d in mine
                ]
                targets, rows_tokens = distributed.all_reduce_sum(
                    [
                        float(sum(count_targets(b["labels"]) for b in ptx_batches)),
                        float(sum(b["input_ids"].numel() for b in ptx_batches)),
                    ]
                )
                global_ptx = int(targets)
                ptx_rows_tokens += rows_tokens
            bad = False
            for idx, ptx_batch in zip(micros, ptx_batches):
                mb = exp.rows(idx, width=max(lengths[i] for i in idx))
                losses, stats = [], {}
                if run.critic is not None:
                    v_loss, v_stats = critic_loss(run, mb, global_tokens)
                    losses.append(v_loss)
                    stats.update(v_stats)
                if train_actor:
                    a_loss, a_stats = actor_loss(run, mb, global_tokens, ptx_batch, global_ptx)
                    losses.append(a_loss)
                    stats.update(a_stats)
                bad = any_rank_nonfinite(losses) or bad
                if run.critic is not None:
                    run.critic.backward(v_loss if not bad else run.critic.zero_loss())
                    run.critic.step(skip=bad)
                if train_actor:
                    run.actor.backward(a_loss if not bad else run.actor.zero_loss())
                    run.actor.step(skip=bad)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
            skipped += int(bad)
            tokens_total += global_tokens
            ptx_tokens_total += global_ptx
    if skipped:
        run.nan_streak += 1
        if run.nan_streak >= p.max_nan_steps:
            raise FloatingPointError(
                f"non-finite PPO loss in {run.nan_streak} iterations in a row (step {step}); "
                "lower the learning rates or check the reward model"
            )
    else:
        run.nan_streak = 0
    totals = distributed.all_reduce_sums(sums) if sums else {}
    per_token = max(tokens_total, 1)
    out = {k: v / per_token for k, v in totals.items() if k != "ptx_loss"}
    if "ptx_loss" in totals:
        out["ptx_loss"] = totals["ptx_loss"] / max(ptx_tokens_total, 1)
    out["skipped_minibatches"] = float(skipped)
    # what was trained on, all ranks: every sequence token through the value model (and the policy), ptx rows
    seq_tokens = distributed.all_reduce_sum([float(exp.attention_mask.sum())])[0] * p.ppo_epochs
    policy_tokens = seq_tokens + ptx_rows_tokens if train_actor else 0.0
    value_tokens = seq_tokens if run.critic is not None else 0.0
    out["trained_tokens"] = value_tokens + policy_tokens
    out["trained_flops"] = policy_tokens * run.actor.module.config.flops_per_token(exp.input_ids.shape[1])
    if run.critic is not None:
        out["trained_flops"] += value_tokens * run.critic.module.config.flops_per_token(exp.input_ids.shape[1])
        with torch.no_grad():
            out["explained_variance"] = float(explained_variance(exp.values, exp.returns, exp.response_mask))
    return out


@torch.no_grad()
def evaluate(run: Run, step: int) -> dict[str, float]:
    """Mean reward and KL on held-out prompts (sampled as in training), and the loss on held-out ptx rows."""
    out: dict[str, float] = {}
    p = run.cfg.ppo
    if run.eval_prompts:
        mine = run.eval_prompts[distributed.rank() :: distributed.world_size()]
        prompt_list = [ids for _, _, ids in mine for _ in range(p.eval_samples)]
        sampling = sampling_for(run, mine, -1, p.eval_samples)  # the same seeds at every evaluation
        rollouts = run.rollout.generate(prompt_list, sampling)
        messages = [m for _, m, _ in mine for _ in range(p.eval_samples)]
        texts = [response_text(run.tokenizer, r) for r in rollouts]
        mb = experience_batch(run.cfg)
        raw = total_reward(run, messages, texts, mb)[0]
        ids, att, mask, _ = build_sequences(prompt_list, rollouts, run.tokenizer.pad_id)
        ids, att, mask = ids.to(distributed.device()), att.to(distributed.device()), mask.to(distributed.device())
        run.actor.eval()
        lp = sequence_logprobs(run.actor.forward, ids, att, mb)
        run.actor.train()
        with resident(run.ref_policy, run.cfg.models.offload_frozen) as ref_policy:
            ref = sequence_logprobs(ref_policy, ids, att, mb)
        kl_each = (kl_estimate(lp, ref, "k1") * mask).sum(-1)  # (B,) nats per response
        n, mean, var = (float(m) for m in masked_moments(raw, torch.ones_like(raw), distributed.all_reduce))
        kl = distributed.all_reduce_sum([float(kl_each.sum())])[0]
        judged = {}
        if run.judges:
            references = reference_answers(run, step, mine, prompt_list, texts) if run.judges.needs_references else None
            judged, counts = run.judges.score(messages, texts, references)
            out.update(judge_metrics(distributed.all_reduce_sums(counts)))
        write_eval_samples(run.out_dir, step, messages, texts, raw.tolist(), kl_each.tolist(), judged)
        out.update({"reward_mean": mean, "reward_std": math.sqrt(var), "kl": kl / n})
        watch_for_hacking(run, step, out)
    if run.bench_prompts:  # greedy answers from the rollout engine (the current policy), each rank its share
        mine = run.bench_prompts[distributed.rank() :: distributed.world_size()]
        sampling = SamplingParams(
            max_new_tokens=max(b.max_new_tokens for b in run.cfg.eval.benchmarks),
            temperature=0.0,
            stop_token_ids=(run.tokenizer.im_end_id, run.tokenizer.eod_id),
            vocab_limit=len(run.tokenizer),
        )
        rollouts = run.rollout.generate([ids for _, _, ids in mine], sampling) if mine else []
        counts = benchmark_counts(mine, [response_text(run.tokenizer, r) for r in rollouts])
        names = {b.name for b in run.cfg.eval.benchmarks}
        counts = {f"{n}/{k}": counts.get(f"{n}/{k}", 0.0) for n in names for k in ("right", "n")}  # same keys
        out.update(benchmark_metrics(distributed.all_reduce_sums(counts)))
    if run.ptx is not None and run.ptx_eval:
        run.actor.eval()
        mine = run.ptx_eval[distributed.rank() :: distributed.world_size()]
        loss_sum = targets = 0.0
        for i in range(0, len(mine), run.cfg.ppo.ptx_batch_size):
            b = {
                k: v.to(distributed.device())
                for k, v in run.ptx.batch(mine[i : i + run.cfg.ppo.ptx_batch_size]).items()
            }
            loss_sum += float(
                run.actor.forward(b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss_sum
            )
            targets += count_targets(b["labels"])
        run.actor.train()
        total, n = distributed.all_reduce_sum([loss_sum, targets])
        out["ptx_loss"] = total / max(n, 1)
    return out


def reference_answers(run: Run, step: int, mine: list, prompt_list: list, texts: list[str]) -> list[str]:
    """The SFT policy's answers to this rank's eval prompts (the llm judge's baseline), sampled with the
    evaluation's seeds: at step 0 the policy's own answers, later the frozen reference's; cached in the run folder."""
    rank = "" if distributed.world_size() == 1 else f".rank{distributed.rank()}"
    path = run.out_dir / f"judge_references{rank}.json"
    if path.exists():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if len(cached) == len(texts):
            return cached
    if step == 0:
        answers = list(texts)
    else:
        from ppo.rollout.native import NativeEngine

        with resident(run.ref_policy, run.cfg.models.offload_frozen) as ref_policy:
            engine = NativeEngine.sharing(ref_policy, run.tokenizer.pad_id, run.cfg.ppo.generate_batch_size)
            rollouts = engine.generate(prompt_list, sampling_for(run, mine, -1, run.cfg.ppo.eval_samples))
        answers = [response_text(run.tokenizer, r) for r in rollouts]
    write_json_atomic(path, answers)
    return answers


def gold_history(out_dir: Path, gold: str | None) -> list[tuple[int, float, float]]:
    """(step, proxy reward, gold) of the evaluations already in the run's metrics (for a resumed run)."""
    if gold is None or not (out_dir / "metrics.jsonl").exists():
        return []
    key = f"eval/judge/{gold}"
    return [(r["step"], r["eval/reward_mean"], r[key]) for r in read_metrics(out_dir) if key in r]


def watch_for_hacking(run: Run, step: int, out: dict[str, float]) -> None:
    """Record this evaluation's proxy and gold; warn (and log `hacking_warning`) when the proxy has risen while
    the gold fell over the last `eval.hacking_window` evaluations."""
    gold = run.cfg.eval.gold_name()
    if gold is None or f"judge/{gold}" not in out:
        return
    run.eval_history = [h for h in run.eval_history if h[0] < step] + [(step, out["reward_mean"], out[f"judge/{gold}"])]
    steps, proxy, golds = zip(*run.eval_history)
    warning = hacking_warning(list(steps), list(proxy), list(golds), run.cfg.eval.hacking_window)
    out["hacking_warning"] = float(warning is not None)
    if warning and distributed.rank() == 0:
        print(f"[ppo] step {step}: {warning}", flush=True)


def probe_sequence(run: Run) -> list[int]:
    """A fixed sequence the engine and the policy both score after a sync: the first prompt and a reply."""
    reply = run.tokenizer.encode("A fixed reply that checks the rollout engine holds the policy's weights.")
    return (run.prompts[0][2] + reply)[-256:]


def sync_weights(run: Run, step: int) -> dict[str, float]:
    """Send the updated policy to the rollout engine (when it keeps its own copy), time it, and every
    `ppo.sync_check_every` syncs check the engine against the policy on the probe sequence."""
    p = run.cfg.ppo
    t0 = time.perf_counter()
    if not sync_rollout_weights(run.rollout, run.actor, bucket_bytes(run.cfg)):
        return {}
    out = {"time/weight_sync_s": time.perf_counter() - t0}
    run.syncs += 1
    if p.sync_check_every and run.syncs % p.sync_check_every == 0:
        out["sync_logprob_diff"] = check_sync(run.rollout, run.actor, probe_sequence(run), p.sync_check_tolerance, step)
    return out


def save(run: Run, folder_step: int) -> None:
    def save_models(folder: Path) -> None:
        save_from_engine(run.actor, run.actor.module.config, run.tokenizer, folder / "policy", distributed.rank() == 0)
        if run.critic is not None:
            save_value(run, folder / "value")

    state = run.state.at_step(
        folder_step,
        run.cfg.ppo.rollout_batch_size * distributed.world_size(),
        {"kl_ctl": run.kl_ctl.state_dict(), "reward_moments": run.moments.state_dict()},
    )
    loop = run.cfg.train
    save_checkpoint(engines(run.actor, run.critic), run.out_dir, state, save_models, loop.keep_last, loop.save_state)


def save_value(run: Run, folder: Path) -> None:
    state = run.critic.full_state_dict()
    if distributed.rank() != 0:
        return
    value_model = run.critic.module
    save_reward_state(
        state, value_model.config, value_model.rm.reward_config(), folder, run.rm_tokenizer, prefix=ValueModel.RM_PREFIX
    )


def train(run: Run) -> dict[str, float]:
    p, loop = run.cfg.ppo, run.cfg.train
    rank0 = distributed.rank() == 0
    last = min(p.iterations, loop.stop_after or p.iterations)
    if run.state.step == 0 and loop.eval_every:
        run.logger.log(0, evaluate(run, 0), prefix="eval/")
    bar = tqdm(total=p.iterations, initial=run.state.step, disable=not rank0, desc="ppo", unit="iter")
    metrics: dict[str, float] = {}
    for step in range(run.state.step, last):
        exp, metrics, samples = make_experience(run, step)
        t0 = time.perf_counter()
        train_actor = step >= p.critic_warmup_steps
        if hasattr(run.rollout, "sleep"):  # vLLM frees its GPU memory (weights, KV cache) while the policy trains
            run.rollout.sleep()
        metrics.update(ppo_update(run, exp, step, train_actor))
        done = step + 1
        metrics.update(sync_weights(run, done))  # wakes a sleeping vLLM engine's weights
        metrics["time/train_s"] = time.perf_counter() - t0
        rate = run.throughput(metrics["trained_tokens"], metrics["time/train_s"], metrics.pop("trained_flops"))
        metrics.update({"train_tokens_per_s": rate["tokens_per_s"], "mfu": rate["mfu"]})
        run.kl_ctl.update(metrics["kl"], p.rollout_batch_size * p.n_samples * distributed.world_size())
        metrics["policy_updated"] = float(train_actor)
        if done % loop.log_every == 0 or done == last:
            run.logger.log(done, metrics, prefix="train/")
        if rank0 and (done % p.sample_every == 0 or done == 1):
            with (run.out_dir / "samples.jsonl").open("a") as f:
                for s in samples[:4]:
                    f.write(json.dumps({"step": done, **s}, ensure_ascii=False) + "\n")
        if loop.eval_every and done % loop.eval_every == 0:
            run.logger.log(done, evaluate(run, done), prefix="eval/")
        if (loop.save_every and done % loop.save_every == 0) or done == last:
            save(run, done)
        bar.set_postfix(reward=f"{metrics['reward/raw']:.3f}", kl=f"{metrics['kl']:.3f}")
        bar.update(1)
    bar.close()
    if last == p.iterations and run.state.step < p.iterations:
        save_from_engine(run.actor, run.actor.module.config, run.tokenizer, run.out_dir / "final" / "policy", rank0)
        if run.critic is not None:
            save_value(run, run.out_dir / "final" / "value")
        if rank0:
            print(f"[ppo] wrote {run.out_dir / 'final'}")
    run.logger.close()
    return metrics


def main(cfg: PPOConfig) -> dict[str, float]:
    return train(setup(cfg))
