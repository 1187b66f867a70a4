"""Reward-model training: `align rm pmp CONFIG` (preference model pretraining) and `align rm train CONFIG`
(fine-tuning on human comparisons, usually with `init=` a PMP checkpoint).

Both stages are the same loop over preference pairs: Bradley-Terry loss, optional margin from preference
strength, optional language-model loss on the chosen response. Read top to bottom: setup → train → save.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm import tqdm

from align.core import distributed
from align.core.batching import MicroBatches, split_eval
from align.core.checkpointing import TrainingState, open_run, save_checkpoint
from align.core.config import ConfigError, Section
from align.core.engine import TrainEngine
from align.core.losses import count_targets, normalised_loss
from align.core.metrics import MetricsLogger, Throughput
from align.core.modeling import build_model, load_tokenizer
from align.core.sections import DeepSpeedSection, LoopConfig, ModelSource, OptimConfig
from base_model import QwenTokenizer
from rm.data import collate_pairs, encode_pairs, load_pairs
from rm.losses import bradley_terry_loss_sum
from rm.model import (
    Pooling,
    RewardModel,
    is_reward_model,
    load_trained_reward_model,
    save_reward_state,
)


class RMData(Section):
    train: str
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    max_len: int = Field(2048, ge=8)
    binarize: bool = True  # PMP binarisation of forum threads (GOOD:/BAD: pairs)
    limit: int | None = Field(None, ge=1)  # use only the first N pairs (after shuffling with the seed)
    balance_n: int | None = Field(None, ge=1)  # draw N pairs by tag-balanced sampling over their tags
    balance_method: Literal["complexity-first", "capped", "temperature"] = "capped"
    # records that cannot be read or give no single-reply pair (public sets carry a few): counted and reported with
    # their file:line ("skip"), or the first one stops the run ("raise")
    on_error: Literal["raise", "skip"] = "skip"


class RMLoss(Section):
    margin_scale: float = 0.0  # margin = margin_scale * preference strength
    lm_coef: float = 0.0  # weight of a language-model loss on the chosen response


class RMConfig(Section):
    model: ModelSource = ModelSource()
    init: str | None = None  # a reward-model folder (e.g. the PMP result) to start from; overrides model.init
    data: RMData
    pooling: Pooling = "end_token"
    end_token: str = "<|endoftext|>"
    loss: RMLoss = RMLoss()
    optim: OptimConfig = OptimConfig(lr=3e-6, schedule="constant", weight_decay=0.0)
    train: LoopConfig = LoopConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    out_dir: str = "runs/rm"
    resume: bool | str = False
    stage: Literal["pmp", "finetune"] = "finetune"


@dataclass
class Run:
    cfg: RMConfig
    engine: TrainEngine
    tokenizer: QwenTokenizer
    lm_config: object
    batches: MicroBatches
    train_pairs: list
    eval_pairs: list
    total_steps: int
    state: TrainingState  # as resumed; `state.step` is where this run starts
    logger: MetricsLogger
    out_dir: Path
    throughput: Throughput


def build_reward_model(cfg: RMConfig) -> tuple[RewardModel, QwenTokenizer]:
    if cfg.init is not None:
        if not is_reward_model(cfg.init):
            raise ConfigError(f"init={cfg.init}: not a reward-model folder (no reward_head.safetensors)")
        model = load_trained_reward_model(cfg.init, cfg.deepspeed, distributed.device())
        tokenizer = load_tokenizer(ModelSource(init=cfg.init, tokenizer=cfg.model.tokenizer))
        model.train()
        return model, tokenizer
    lm, tokenizer = build_model(cfg.model, cfg.train.seed, distributed.device(), cfg.deepspeed)
    end_id = tokenizer.special_tokens.get(cfg.end_token)
    if end_id is None:
        raise ConfigError(f"end_token={cfg.end_token!r} is not a special token of the tokenizer")
    torch.manual_seed(cfg.train.seed)
    return RewardModel(lm, cfg.pooling, end_id), tokenizer


def setup(cfg: RMConfig) -> Run:
    distributed.init()
    rank0 = distributed.rank() == 0
    out_dir = Path(cfg.out_dir)
    model, tokenizer = build_reward_model(cfg)
    end_id = model.end_token_id if model.end_token_id is not None else tokenizer.special_tokens[cfg.end_token]
    d = cfg.data
    pairs, report = load_pairs(d.train, d.binarize, d.on_error)
    if d.balance_n is not None:
        from rm.tags.sampler import sample, tag_matrix

        if not any(p.tags for p in pairs):
            raise ConfigError(f"data.balance_n is set but no pair in {d.train} carries tags")
        matrix, _ = tag_matrix([p.tags for p in pairs])
        pairs = [pairs[i] for i in sample(matrix, d.balance_n, d.balance_method, cfg.train.seed)]
    if d.limit is not None:
        import random

        order = list(range(len(pairs)))
        random.Random(cfg.train.seed).shuffle(order)
        pairs = [pairs[i] for i in order[: d.limit]]
    if d.eval:
        eval_pairs, _ = load_pairs(d.eval, d.binarize, d.on_error)
    else:
        pairs, eval_pairs = split_eval(pairs, d.eval_fraction, cfg.train.seed)
    train_rows, cut = encode_pairs(pairs, tokenizer, d.max_len, end_id)
    eval_rows, _ = encode_pairs(eval_pairs, tokenizer, d.max_len, end_id)
    if rank0:
        print(
            f"[rm {cfg.stage}] {report.records} records → {len(train_rows)} training pairs, "
            f"{len(eval_rows)} held out; {report.ties} ties excluded; {cut} pairs truncated to {d.max_len} tokens"
        )
        if report.skipped:
            left_out = ", ".join(f"{n} {reason}" for reason, n in report.skipped.items())
            print(f"[rm {cfg.stage}] left out {left_out} (data.on_error=raise stops instead); first:")
            for example in report.examples:
                print(f"  {example}")
    loop = cfg.train
    batches = MicroBatches(train_rows, loop.micro_batch_size, distributed.rank(), distributed.world_size(), loop.seed)
    total_steps = loop.max_steps or math.ceil(loop.epochs * max(batches.per_epoch // loop.grad_accum, 1))
    lm_config = model.lm.config
    throughput = Throughput.measured(lm_config.flops_per_token(d.max_len), loop.peak_tflops, cfg.deepspeed.bf16)
    engine = TrainEngine(model, cfg.optim, cfg.deepspeed, total_steps, loop.micro_batch_size, loop.grad_accum)
    fresh = TrainingState.start(total_steps, loop.micro_batch_size, loop.grad_accum, loop.seed)
    state, logger = open_run(cfg, out_dir, {"model": engine}, f"rm {cfg.stage}", fresh)
    return Run(
        cfg,
        engine,
        tokenizer,
        lm_config,
        batches,
        train_rows,
        eval_rows,
        total_steps,
        state,
        logger,
        out_dir,
        throughput,
    )


def chosen_lm_labels(batch: dict) -> torch.Tensor:
    """(B, L) language-model labels: the chosen responses' tokens (the first B of the 2B rows), -100 elsewhere."""
    b = batch["strength"].shape[0]
    return torch.where(batch["response_mask"][:b].bool(), batch["input_ids"][:b], -100)


def pair_losses(run: Run, batch: dict, global_pairs: int, global_lm_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's share of the step loss, and its sums for logging (STAT_KEYS, on the device)."""
    b = batch["strength"].shape[0]
    want_lm = run.cfg.loss.lm_coef > 0
    labels = chosen_lm_labels(batch) if want_lm else None
    out = run.engine.forward(batch["input_ids"], batch["attention_mask"], batch["response_mask"], lm_labels=labels)
    chosen, rejected = out.rewards[:b].float(), out.rewards[b:].float()
    margin = run.cfg.loss.margin_scale * batch["strength"] if run.cfg.loss.margin_scale else None
    bt_sum = bradley_terry_loss_sum(chosen, rejected, margin)
    loss = normalised_loss(bt_sum, global_pairs)
    lm_sum = torch.zeros((), device=bt_sum.device)
    if want_lm:
        lm_sum = out.lm_loss_sum
        loss = loss + run.cfg.loss.lm_coef * normalised_loss(lm_sum, global_lm_targets)
    diff = (chosen - rejected).detach()
    stats = torch.stack([bt_sum.detach(), lm_sum.detach(), (diff > 0).sum().float(), diff.sum()])  # STAT_KEYS
    return loss, stats


STAT_KEYS = ("bt_sum", "lm_sum", "correct", "margin_sum")


def train_step(run: Run, step: int) -> dict[str, float]:
    accum = run.cfg.train.grad_accum
    micro = [collate_pairs(run.batches.get(step * accum + i), run.tokenizer.pad_id) for i in range(accum)]
    n_pairs = sum(m["strength"].shape[0] for m in micro)
    lm_targets = sum(count_targets(chosen_lm_labels(m)) for m in micro)  # the LM term is on chosen rows only
    global_pairs, global_lm = (int(x) for x in distributed.all_reduce_sum([n_pairs, lm_targets]))
    tokens = float(sum(m["attention_mask"].sum() for m in micro))  # real tokens, counted on the host
    sums = torch.zeros(len(STAT_KEYS), device=distributed.device())
    stats = None
    for m in micro:
        m = {k: v.to(distributed.device(), non_blocking=True) for k, v in m.items()}
        loss, s = pair_losses(run, m, global_pairs, global_lm)
        run.engine.backward(loss)
        stats = run.engine.step() or stats
        sums += s
    bt, lm, correct, margin, tokens = distributed.all_reduce_sum(sums.tolist() + [tokens])  # the step's one host sync
    metrics = {
        "loss": bt / global_pairs,
        "accuracy": correct / global_pairs,
        "margin": margin / global_pairs,
        "tokens": tokens,
        **(stats or {}),
    }
    if run.cfg.loss.lm_coef > 0:
        metrics["lm_loss"] = lm / max(global_lm, 1)
    return metrics


@torch.no_grad()
def score_rows(run: Run, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Rewards of (chosen, rejected) for rows sharded over ranks, gathered on every rank in order."""
    run.engine.eval()
    mine = list(range(distributed.rank(), len(rows), distributed.world_size()))
    chosen = torch.zeros(len(rows), dtype=torch.float64)
    rejected = torch.zeros(len(rows), dtype=torch.float64)
    mb = run.cfg.train.micro_batch_size
    for i in range(0, len(mine), mb):
        idx = mine[i : i + mb]
        batch = {
            k: v.to(distributed.device())
            for k, v in collate_pairs([rows[j] for j in idx], run.tokenizer.pad_id).items()
        }
        rewards = run.engine.forward(batch["input_ids"], batch["attention_mask"], batch["response_mask"]).rewards
        chosen[idx] = rewards[: len(idx)].double().cpu()
        rejected[idx] = rewards[len(idx) :].double().cpu()
    run.engine.train()
    return distributed.all_reduce_sum(chosen.tolist()), distributed.all_reduce_sum(rejected.tolist())


def evaluate(run: Run) -> dict[str, float]:
    if not run.eval_pairs:
        return {}
    chosen, rejected = score_rows(run, run.eval_pairs)
    diffs = torch.tensor(chosen) - torch.tensor(rejected)
    return {
        "accuracy": float((diffs > 0).double().mean()),
        "loss": float(-torch.nn.functional.logsigmoid(diffs).mean()),
    }


def reward_statistics(run: Run) -> tuple[float, float]:
    """Mean and standard deviation of the reward over every training response (saved for normalisation)."""
    chosen, rejected = score_rows(run, run.train_pairs)
    values = torch.tensor(chosen + rejected)
    return float(values.mean()), float(values.std().clamp(min=1e-6))


def save_models(run: Run, folder: Path, mean: float, std: float) -> None:
    state = run.engine.full_state_dict()  # every rank gathers
    if distributed.rank() != 0:
        return
    config = {**run.engine.module.reward_config(), "mean": mean, "std": std}
    save_reward_state(state, run.lm_config, config, folder, run.tokenizer)


def train(run: Run) -> dict[str, float]:
    loop = run.cfg.train
    rank0 = distributed.rank() == 0
    last_step = min(run.total_steps, loop.stop_after or run.total_steps)
    bar = tqdm(
        total=run.total_steps, initial=run.state.step, disable=not rank0, desc=f"rm {run.cfg.stage}", unit="step"
    )
    run.engine.train()
    metrics: dict[str, float] = {}
    module = run.engine.module
    for step in range(run.state.step, last_step):
        t0 = time.perf_counter()
        metrics = train_step(run, step)
        metrics.update(run.throughput(metrics["tokens"], time.perf_counter() - t0))
        done = step + 1
        if done % loop.log_every == 0 or done == last_step:
            run.logger.log(done, metrics, prefix="train/")
        if loop.eval_every and done % loop.eval_every == 0:
            run.logger.log(done, evaluate(run), prefix="eval/")
        if (loop.save_every and done % loop.save_every == 0) or done == last_step:
            state = run.state.at_step(done)
            save_checkpoint(
                {"model": run.engine},
                run.out_dir,
                state,
                lambda folder: save_models(run, folder, module.mean, module.std),
                loop.keep_last,
                loop.save_state,
            )
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
        bar.update(1)
    bar.close()
    if last_step == run.total_steps and run.state.step < run.total_steps:
        final_eval = evaluate(run)
        run.logger.log(run.total_steps, final_eval, prefix="eval/")
        metrics.update({f"eval_{k}": v for k, v in final_eval.items()})
        mean, std = reward_statistics(run)
        save_models(run, run.out_dir / "final", mean, std)
        if rank0:
            print(f"[rm {run.cfg.stage}] wrote {run.out_dir / 'final'} (reward mean {mean:.3f}, std {std:.3f})")
    run.logger.close()
    return metrics


def main(cfg: RMConfig) -> dict[str, float]:
    return train(setup(cfg))
