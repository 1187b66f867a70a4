"""ChatML supervised fine-tuning: `align sft CONFIG [key=value …]`.

Read top to bottom: `setup()` loads config, model, data and engine (and resumes); `train()` is the loop; the
loss is the mean over every assistant token of the global batch, however it is split into micro-batches.
`run_stages()` runs a multi-stage config (`stages:`), each stage starting from the last one's weights.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError
from tqdm import tqdm

from align.core import distributed
from align.core.batching import MicroBatches, split_eval
from align.core.checkpointing import TrainingState, open_run, save_checkpoint
from align.core.config import ConfigError, Section, format_validation_error
from align.core.engine import TrainEngine
from align.core.losses import count_targets, normalised_loss
from align.core.metrics import MetricsLogger, Throughput
from align.core.modeling import build_model, save_from_engine
from align.core.sections import DeepSpeedSection, LoopConfig, ModelSource, OptimConfig
from align.eval.harness import BenchmarkConfig
from base_model import QwenTokenizer
from sft.data import MaskMode, Truncation, collate, load_examples, pack_examples


class SFTData(Section):
    train: str
    eval: str | None = None  # a held-out file; otherwise eval_fraction of train is held out
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    max_len: int = Field(2048, ge=8)
    mask_mode: MaskMode = "assistant"
    truncation: Truncation = "drop_oldest"
    packing: bool = False
    on_error: Literal["raise", "skip"] = "raise"


class SFTEval(Section):
    benchmarks: list[BenchmarkConfig] = []  # answered greedily at every evaluation: eval/bench/<name>


class SFTStage(Section):
    """One stage of a multi-stage run: its name and what it changes in the config's `data`, `optim` and `train`
    (validated as the merged config when the run starts)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    train: dict[str, Any] = {}


class SFTConfig(Section):
    model: ModelSource
    data: SFTData
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    eval: SFTEval = SFTEval()
    stages: list[SFTStage] = []  # several stages: each starts from the weights the one before it wrote
    out_dir: str = "runs/sft"
    resume: bool | str = False  # true: continue from the latest checkpoint in out_dir; or a checkpoint path


@dataclass
class Run:
    cfg: SFTConfig
    engine: TrainEngine
    tokenizer: QwenTokenizer
    batches: MicroBatches
    eval_rows: list
    total_steps: int
    state: TrainingState  # as resumed; `state.step` is where this run starts
    logger: MetricsLogger
    out_dir: Path
    throughput: Throughput
    bench_prompts: list = field(default_factory=list)  # (benchmark, item, prompt ids) of eval.benchmarks


def setup(cfg: SFTConfig) -> Run:
    distributed.init()
    rank0 = distributed.rank() == 0
    out_dir = Path(cfg.out_dir)
    model, tokenizer = build_model(cfg.model, cfg.train.seed, distributed.device(), cfg.deepspeed)
    d = cfg.data
    examples, report = load_examples(d.train, tokenizer, d.max_len, d.mask_mode, d.truncation, d.on_error)
    if d.eval:
        eval_rows, _ = load_examples(d.eval, tokenizer, d.max_len, d.mask_mode, d.truncation, d.on_error)
    else:
        examples, eval_rows = split_eval(examples, d.eval_fraction, cfg.train.seed)
    if rank0:
        print(f"[sft] train data: {report.summary()}")
        for problem in report.first_problems:
            print(f"[sft]   skipped: {problem}")
    rows = pack_examples(examples, d.max_len) if d.packing else examples
    loop = cfg.train
    batches = MicroBatches(rows, loop.micro_batch_size, distributed.rank(), distributed.world_size(), loop.seed)
    steps_per_epoch = max(batches.per_epoch // loop.grad_accum, 1)
    total_steps = loop.max_steps or math.ceil(loop.epochs * steps_per_epoch)

    throughput = Throughput.measured(model.config.flops_per_token(d.max_len), loop.peak_tflops, cfg.deepspeed.bf16)
    engine = TrainEngine(model, cfg.optim, cfg.deepspeed, total_steps, loop.micro_batch_size, loop.grad_accum)
    fresh = TrainingState.start(total_steps, loop.micro_batch_size, loop.grad_accum, loop.seed)
    state, logger = open_run(cfg, out_dir, {"model": engine}, "sft", fresh)
    from align.eval.harness import benchmark_prompts

    bench = benchmark_prompts(cfg.eval.benchmarks, tokenizer)
    return Run(cfg, engine, tokenizer, batches, eval_rows, total_steps, state, logger, out_dir, throughput, bench)


def evaluate(run: Run) -> dict[str, float]:
    """Mean token loss over the held-out rows (sharded over ranks) and the eval.benchmarks scores."""
    out: dict[str, float] = {}
    if run.bench_prompts:
        from align.eval.generation import benchmark_scores

        out.update(benchmark_scores(run.engine, run.tokenizer, run.bench_prompts, run.cfg.eval.benchmarks))
    if run.eval_rows:
        out["loss"] = eval_loss(run)
    return out


def eval_loss(run: Run) -> float:
    run.engine.eval()
    mine = run.eval_rows[distributed.rank() :: distributed.world_size()]
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(mine), run.cfg.train.micro_batch_size):
            batch = {
                k: v.to(distributed.device())
                for k, v in collate(mine[i : i + run.cfg.train.micro_batch_size], run.tokenizer.pad_id).items()
            }
            loss_sum += run.engine.forward(batch["input_ids"], labels=batch["labels"]).loss_sum.item()
            targets += count_targets(batch["labels"])
    total_loss, total_targets = distributed.all_reduce_sum([loss_sum, targets])
    run.engine.train()
    return total_loss / max(total_targets, 1)


def train_step(run: Run, step: int) -> dict[str, float]:
    """One optimizer step over grad_accum micro-batches; returns the step's mean token loss and counts."""
    accum = run.cfg.train.grad_accum
    rows = [run.batches.get(step * accum + i) for i in range(accum)]
    tokens = sum(len(r["input_ids"]) for micro_rows in rows for r in micro_rows)  # real tokens, no padding
    micro = [collate(micro_rows, run.tokenizer.pad_id) for micro_rows in rows]
    local_targets = sum(count_targets(b["labels"]) for b in micro)
    global_targets = int(distributed.all_reduce_sum([local_targets])[0])
    loss_share, stats = torch.zeros((), device=distributed.device()), None
    for b in micro:
        b = {k: v.to(distributed.device(), non_blocking=True) for k, v in b.items()}
        out = run.engine.forward(b["input_ids"], position_ids=b.get("position_ids"), labels=b["labels"])
        loss = normalised_loss(out.loss_sum, global_targets)
        run.engine.backward(loss)
        stats = run.engine.step() or stats
        loss_share += loss.detach()
    loss_total, tokens_total = distributed.all_reduce_sum([loss_share.item(), tokens])  # the step's one host sync
    return {"loss": loss_total, "tokens": tokens_total, "target_tokens": global_targets, **(stats or {})}


def train(run: Run) -> dict[str, float]:
    loop = run.cfg.train
    rank0 = distributed.rank() == 0
    last_step = min(run.total_steps, loop.stop_after or run.total_steps)
    bar = tqdm(total=run.total_steps, initial=run.state.step, disable=not rank0, desc="sft", unit="step")
    run.engine.train()
    metrics: dict[str, float] = {}
    last_eval: tuple[int, dict[str, float]] | None = None
    if run.state.step == 0 and loop.eval_every and run.bench_prompts:  # the baseline the alignment tax is measured on
        run.logger.log(0, evaluate(run), prefix="eval/")
    for step in range(run.state.step, last_step):
        t0 = time.perf_counter()
        metrics = train_step(run, step)
        metrics.update(run.throughput(metrics["tokens"], time.perf_counter() - t0))
        done = step + 1
        if done % loop.log_every == 0 or done == last_step:
            run.logger.log(done, metrics, prefix="train/")
        if loop.eval_every and done % loop.eval_every == 0:
            last_eval = (done, evaluate(run))
            run.logger.log(done, last_eval[1], prefix="eval/")
        if (loop.save_every and done % loop.save_every == 0) or done == last_step:
            save(run, done)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", mfu=f"{metrics['mfu']:.1%}"
        )
        bar.update(1)
    bar.close()
    if last_step == run.total_steps and run.state.step < run.total_steps:
        if last_eval is not None and last_eval[0] == run.total_steps:
            final_eval = last_eval[1]
        else:
            final_eval = evaluate(run)
            run.logger.log(run.total_steps, final_eval, prefix="eval/")
        metrics["eval_loss"] = final_eval.get("loss", float("nan"))
        metrics.update({f"eval_{k}": v for k, v in final_eval.items() if k != "loss"})
        save_from_engine(run.engine, run.engine.module.config, run.tokenizer, run.out_dir / "final", rank0)
        if rank0:
            print(f"[sft] wrote {run.out_dir / 'final'}")
    run.logger.close()
    return metrics


def save(run: Run, step: int) -> None:
    def save_models(folder: Path) -> None:
        save_from_engine(run.engine, run.engine.module.config, run.tokenizer, folder, distributed.rank() == 0)

    loop = run.cfg.train
    state = run.state.at_step(step)
    save_checkpoint({"model": run.engine}, run.out_dir, state, save_models, loop.keep_last, loop.save_state)


def stage_configs(cfg: SFTConfig) -> list[SFTConfig]:
    """One whole config per stage: the base config with the stage's changes, in `OUT/stages/<i>-<name>`; every
    stage after the first starts from the `final` weights of the one before it. Validated before anything runs."""
    if len({s.name for s in cfg.stages}) != len(cfg.stages):
        raise ConfigError(f"stages: names must be unique, got {[s.name for s in cfg.stages]}")
    base = cfg.model_dump(exclude={"stages"})
    out, previous = [], None
    for i, stage in enumerate(cfg.stages):
        merged = copy.deepcopy(base)
        for section in ("data", "optim", "train"):
            merged[section].update(getattr(stage, section))
        merged["out_dir"] = str(Path(cfg.out_dir) / "stages" / f"{i + 1}-{stage.name}")
        merged["resume"] = bool(cfg.resume)
        if previous is not None:
            merged["model"] = {**merged["model"], "init": str(Path(previous) / "final"), "config": None,
                               "tokenizer": None, "fit_vocab": False}  # fmt: skip
        try:
            out.append(SFTConfig.model_validate(merged))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"stages[{i}] ({stage.name})", set())) from None
        previous = merged["out_dir"]
    return out


def run_stages(cfg: SFTConfig) -> dict[str, float]:
    """Run the stages in order. With `resume=true` a finished stage (its `final` written and recorded in
    `OUT/stages.json`) is not run again and the unfinished one continues from its latest checkpoint, so a run
    killed in any stage resumes there. `OUT/final` links to the last stage's weights."""
    from base_model.atomic import write_json_atomic

    configs = stage_configs(cfg)
    out = Path(cfg.out_dir)
    record_path = out / "stages.json"
    record = json.loads(record_path.read_text()) if cfg.resume and record_path.exists() else {}
    rank0 = distributed.rank() == 0
    metrics: dict[str, float] = {}
    for i, (stage, stage_cfg) in enumerate(zip(cfg.stages, configs)):
        tag = f"{i + 1}-{stage.name}"
        if record.get(tag, {}).get("done") and (Path(stage_cfg.out_dir) / "final").exists():
            if rank0:
                print(f"[sft] stage {i + 1}/{len(configs)} '{stage.name}': done, skipped")
            continue
        if rank0:
            print(f"[sft] stage {i + 1}/{len(configs)} '{stage.name}': {stage_cfg.data.train} -> {stage_cfg.out_dir}")
        run = setup(stage_cfg)
        metrics = train(run)
        stopped = stage_cfg.train.stop_after is not None and stage_cfg.train.stop_after < run.total_steps
        del run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if stopped:
            return metrics  # `train.stop_after` ended this stage early: `resume=true` continues it
        record[tag] = {"done": True, "out_dir": stage_cfg.out_dir, "metrics": metrics}
        if rank0:
            write_json_atomic(record_path, record)
    if rank0:
        final = out / "final"
        target = Path("stages") / f"{len(configs)}-{cfg.stages[-1].name}" / "final"
        if final.is_symlink() or final.exists():
            final.unlink()
        final.symlink_to(target, target_is_directory=True)
        print(f"[sft] all {len(configs)} stages done; {final} -> {target}")
    return metrics


def main(cfg: SFTConfig) -> dict[str, float]:
    if cfg.stages:
        return run_stages(cfg)
    return train(setup(cfg))
