"""Pretraining and continued pretraining on packed data: `align pretrain CONFIG [key=value …]`.

AdamW (0.9, 0.95, 1e-8), linear warmup then cosine decay to 10% of the peak, bf16 where the hardware has it,
gradient clipping and accumulation, packed attention, periodic evaluation, full-state checkpoints, resume.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from tqdm import tqdm

from align.core import distributed
from align.core.batching import MicroBatches
from align.core.checkpointing import TrainingState, open_run, save_checkpoint
from align.core.config import ConfigError, Section
from align.core.engine import TrainEngine
from align.core.losses import count_targets, normalised_loss
from align.core.metrics import MetricsLogger, Throughput
from align.core.modeling import build_model, save_from_engine
from align.core.sections import DeepSpeedSection, LoopConfig, ModelSource, OptimConfig
from base_model import QwenTokenizer
from base_model.pretrain.packing import PackedDataset, split_rows


class PretrainData(Section):
    train: str  # a packed folder (`align data pack`)
    eval: str | None = None  # a packed folder; otherwise eval_rows rows of train are held out
    eval_rows: int = Field(0, ge=0)


class PretrainConfig(Section):
    model: ModelSource
    data: PretrainData
    optim: OptimConfig = OptimConfig(lr=3e-4, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1)
    train: LoopConfig = LoopConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    out_dir: str = "runs/pretrain"
    resume: bool | str = False


@dataclass
class Run:
    cfg: PretrainConfig
    engine: TrainEngine
    tokenizer: QwenTokenizer
    train_data: PackedDataset
    eval_data: PackedDataset
    eval_indices: list[int]
    batches: MicroBatches
    total_steps: int
    state: TrainingState  # as resumed; `state.step` is where this run starts
    logger: MetricsLogger
    out_dir: Path
    throughput: Throughput


def setup(cfg: PretrainConfig) -> Run:
    distributed.init()
    rank0 = distributed.rank() == 0
    out_dir = Path(cfg.out_dir)
    model, tokenizer = build_model(cfg.model, cfg.train.seed, distributed.device(), cfg.deepspeed)
    train_data = PackedDataset(cfg.data.train)
    if int(train_data.tokens.max()) >= model.config.vocab_size:
        raise ConfigError(
            f"{cfg.data.train}: token ids reach {int(train_data.tokens.max())}, beyond the model's "
            f"vocab_size {model.config.vocab_size}; was it packed with another tokenizer?"
        )
    if cfg.data.eval:
        eval_data = PackedDataset(cfg.data.eval)
        train_rows, eval_indices = list(range(len(train_data))), list(range(len(eval_data)))
    else:
        eval_data = train_data
        train_rows, eval_indices = split_rows(len(train_data), cfg.data.eval_rows, cfg.train.seed)
    loop = cfg.train
    batches = MicroBatches(train_rows, loop.micro_batch_size, distributed.rank(), distributed.world_size(), loop.seed)
    total_steps = loop.max_steps or math.ceil(loop.epochs * max(batches.per_epoch // loop.grad_accum, 1))
    throughput = Throughput.measured(
        model.config.flops_per_token(train_data.seq_len), loop.peak_tflops, cfg.deepspeed.bf16
    )
    engine = TrainEngine(model, cfg.optim, cfg.deepspeed, total_steps, loop.micro_batch_size, loop.grad_accum)
    fresh = TrainingState.start(total_steps, loop.micro_batch_size, loop.grad_accum, loop.seed)
    state, logger = open_run(cfg, out_dir, {"model": engine}, "pretrain", fresh)
    if rank0:
        print(
            f"[pretrain] {len(train_rows)} rows x {train_data.seq_len} tokens, {len(eval_indices)} held out; "
            f"{total_steps} steps"
        )
    return Run(
        cfg,
        engine,
        tokenizer,
        train_data,
        eval_data,
        eval_indices,
        batches,
        total_steps,
        state,
        logger,
        out_dir,
        throughput,
    )


def evaluate(run: Run) -> float:
    if not run.eval_indices:
        return float("nan")
    run.engine.eval()
    mine = run.eval_indices[distributed.rank() :: distributed.world_size()]
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(mine), run.cfg.train.micro_batch_size):
            b = {
                k: v.to(distributed.device())
                for k, v in run.eval_data.batch(mine[i : i + run.cfg.train.micro_batch_size]).items()
            }
            loss_sum += run.engine.forward(
                b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]
            ).loss_sum.item()
            targets += count_targets(b["labels"])
    total, n = distributed.all_reduce_sum([loss_sum, targets])
    run.engine.train()
    return total / max(n, 1)


def train_step(run: Run, step: int) -> dict[str, float]:
    accum = run.cfg.train.grad_accum
    micro = [run.train_data.batch(run.batches.get(step * accum + i)) for i in range(accum)]
    global_targets = int(distributed.all_reduce_sum([sum(count_targets(b["labels"]) for b in micro)])[0])
    tokens = sum(b["input_ids"].numel() for b in micro)  # packed rows: every token is a corpus token
    loss_share, stats = torch.zeros((), device=distributed.device()), None
    for b in micro:
        b = {k: v.to(distributed.device(), non_blocking=True) for k, v in b.items()}
        out = run.engine.forward(b["input_ids"], position_ids=b["position_ids"], labels=b["labels"])
        loss = normalised_loss(out.loss_sum, global_targets)
        run.engine.backward(loss)
        stats = run.engine.step() or stats
        loss_share += loss.detach()
    loss_total, tokens_total = distributed.all_reduce_sum([loss_share.item(), tokens])  # the step's one host sync
    return {"loss": loss_total, "tokens": tokens_total, **(stats or {})}


def train(run: Run) -> dict[str, float]:
    loop = run.cfg.train
    rank0 = distributed.rank() == 0
    last_step = min(run.total_steps, loop.stop_after or run.total_steps)
    bar = tqdm(total=run.total_steps, initial=run.state.step, disable=not rank0, desc="pretrain", unit="step")
    run.engine.train()
    metrics: dict[str, float] = {}
    for step in range(run.state.step, last_step):
        t0 = time.perf_counter()
        metrics = train_step(run, step)
        metrics.update(run.throughput(metrics["tokens"], time.perf_counter() - t0))
        done = step + 1
        if done % loop.log_every == 0 or done == last_step:
            run.logger.log(done, metrics, prefix="train/")
        if loop.eval_every and done % loop.eval_every == 0:
            run.logger.log(done, {"loss": evaluate(run)}, prefix="eval/")
        if (loop.save_every and done % loop.save_every == 0) or done == last_step:
            state = run.state.at_step(done)
            save_checkpoint(
                {"model": run.engine},
                run.out_dir,
                state,
                lambda f: save_from_engine(
                    run.engine, run.engine.module.config, run.tokenizer, f, distributed.rank() == 0
                ),
                loop.keep_last,
                loop.save_state,
            )
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", mfu=f"{metrics['mfu']:.1%}"
        )
        bar.update(1)
    bar.close()
    if last_step == run.total_steps and run.state.step < run.total_steps:
        metrics["eval_loss"] = evaluate(run)
        run.logger.log(run.total_steps, {"loss": metrics["eval_loss"]}, prefix="eval/")
        save_from_engine(run.engine, run.engine.module.config, run.tokenizer, run.out_dir / "final", rank0)
        if rank0:
            print(f"[pretrain] wrote {run.out_dir / 'final'}")
    run.logger.close()
    return metrics


def main(cfg: PretrainConfig) -> dict[str, float]:
    return train(setup(cfg))
