"""Offline preference optimisation: `align dpo CONFIG [key=value …]` (DPO, cDPO, IPO, SimPO, KTO).

Trains a policy on comparison data in every layout the reward model reads (the labelling app's export, HH, TRL,
UltraFeedback, …); KTO also reads TRL's unpaired layout `{"prompt", "completion", "label": true|false}`. Each
training row holds two sequences — chosen and rejected, or for KTO one completion and a mismatched completion
for the KL reference point — rendered with the chat template's tokens, trained on the response and its
`<|im_end|>`. The reference log-probabilities are those of the initial policy, computed once before the first step
and cached in `out_dir/ref_logps.pt`, so no reference model is held in memory. Read top to bottom: `setup()` →
`train()` (the loop) → save.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm import tqdm

from align.core import distributed
from align.core.batching import MicroBatches, split_eval
from align.core.chatml import render_turns
from align.core.checkpointing import TrainingState, open_run, save_checkpoint
from align.core.config import ConfigError, Section
from align.core.engine import TrainEngine, is_partitioned
from align.core.losses import IGNORE_INDEX, summed_logps
from align.core.metrics import MetricsLogger, Throughput
from align.core.modeling import build_model, save_from_engine
from align.core.records import DataError, as_messages, iter_records
from align.core.sections import DeepSpeedSection, LoopConfig, ModelSource, OptimConfig
from align.eval import generation
from align.eval.harness import benchmark_prompts
from align.eval.judges import EvalSection, Judges, judge_metrics
from base_model import QwenTokenizer
from base_model.atomic import atomic_path, write_json_atomic
from rm.data import load_pairs
from sft.data import collate
from sft.preference_losses import dpo_loss, ipo_loss, kto_loss, kto_reference_point, simpo_loss

Loss = Literal["dpo", "cdpo", "ipo", "simpo", "kto"]


class DPOData(Section):
    train: str
    eval: str | None = None  # a held-out file; otherwise eval_fraction of train is held out
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    max_len: int = Field(1024, ge=8)  # prompt + response; longer rows are left out and counted
    on_error: Literal["raise", "skip"] = "skip"
    packing: bool = False  # a micro-batch's sequences packed into rows of max_len tokens (no padding computed)
    eval_prompts: str | None = None  # held-out prompts: sampled at each evaluation, scored by eval.judges, KL
    max_prompt_len: int = Field(1024, ge=8)


class EvalGeneration(Section):
    """How the answers to data.eval_prompts are sampled (the same seeds at every evaluation)."""

    samples: int = Field(1, ge=1)  # answers per prompt
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)


class Objective(Section):
    loss: Loss = "dpo"
    beta: float = Field(0.1, gt=0)  # DPO/cDPO/KTO β, IPO τ, SimPO β
    label_smoothing: float = Field(0.1, ge=0, lt=0.5)  # cDPO's ε (only with loss: cdpo)
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO's target reward margin γ
    kto_desirable_weight: float = Field(1.0, gt=0)
    kto_undesirable_weight: float = Field(1.0, gt=0)


class DPOConfig(Section):
    model: ModelSource
    data: DPOData
    objective: Objective = Objective()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    eval: EvalSection = EvalSection()  # judges of the answers to data.eval_prompts (align/eval/judges.py)
    eval_generation: EvalGeneration = EvalGeneration()
    out_dir: str = "runs/dpo"
    resume: bool | str = False


# ------------------------------------------------------------------------------------------------------ data


def response_sequence(prompt: list[dict], response: str, tokenizer: QwenTokenizer) -> tuple[list[int], list[int]]:
    """ChatML ids of prompt + response, and labels on the response content and its <|im_end|>."""
    ids, turns = render_turns(list(prompt) + [{"role": "assistant", "content": response}], tokenizer)
    last = turns[-1]
    labels = [IGNORE_INDEX] * len(ids)
    labels[last.content_start : last.content_end + 1] = ids[last.content_start : last.content_end + 1]
    return ids, labels


@dataclass
class DataReport:
    rows: int = 0
    too_long: int = 0
    left_out: dict | None = None

    def summary(self) -> str:
        out = f"{self.rows} rows; {self.too_long} left out as longer than max_len"
        return out + "".join(f"; {n} left out ({reason})" for reason, n in (self.left_out or {}).items())


def unpaired_examples(path: str, on_error: str) -> tuple[list[tuple[list[dict], str, bool]], int]:
    """TRL's unpaired layout (`prompt`, `completion`, `label`) → [(prompt messages, completion, desirable)], and
    the number of malformed records left out (on_error=skip; raise stops at the first)."""
    out, skipped = [], 0
    for where, record in iter_records(path):
        try:
            completion = record["completion"]
            if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
                completion = completion[-1].get("content")
            if not isinstance(completion, str) or not isinstance(record["label"], bool):
                raise DataError(f"{where}: 'completion' must be text and 'label' true or false")
            out.append((as_messages(record["prompt"], where), completion, record["label"]))
        except (DataError, KeyError) as e:
            if on_error == "raise":
                raise DataError(str(e) if isinstance(e, DataError) else f"{where}: missing field {e}") from None
            skipped += 1
    return out, skipped


def mismatched_partner(examples: list[tuple], i: int) -> int:
    """The next example (cyclically) whose prompt differs from example i's: its completion is KTO's mismatched
    completion for i (paired data and unpaired files often hold several completions of one prompt in a row)."""
    n = len(examples)
    return next(((i + k) % n for k in range(1, n) if examples[(i + k) % n][0] != examples[i][0]), (i + 1) % n)


def load_rows(path: str, loss: Loss, tokenizer: QwenTokenizer, max_len: int, on_error: str):
    """Training rows, each {"seqs": [(ids, labels), (ids, labels)], "desirable": bool, "index": i}: chosen and
    rejected for paired losses; for KTO, an example and another prompt's completion under this prompt."""
    report = DataReport()
    first = next(iter_records(path), (None, {}))[1]
    if loss == "kto" and "completion" in first and "label" in first:
        examples, malformed = unpaired_examples(path, on_error)
        report.left_out = {"malformed": malformed} if malformed else {}
    else:
        pairs, pair_report = load_pairs(path, binarize=False, on_error=on_error)
        report.left_out = dict(pair_report.skipped)
        if loss == "kto":  # paired data for KTO: the chosen reply is desirable, the rejected one undesirable
            examples = [(p.prompt, text, good) for p in pairs for text, good in ((p.chosen, True), (p.rejected, False))]
        else:
            examples = [(p.prompt, p.chosen, p.rejected) for p in pairs]
    rows = []
    for i, (prompt, a, b) in enumerate(examples):
        if loss == "kto":
            mismatched = examples[mismatched_partner(examples, i)][1]
            seqs, desirable = (
                [response_sequence(prompt, a, tokenizer), response_sequence(prompt, mismatched, tokenizer)],
                b,
            )
        else:
            seqs, desirable = [response_sequence(prompt, a, tokenizer), response_sequence(prompt, b, tokenizer)], True
        if max(len(ids) for ids, _ in seqs) > max_len:
            report.too_long += 1
            continue
        rows.append({"seqs": seqs, "desirable": desirable, "index": len(rows)})
    report.rows = len(rows)
    if not rows:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return rows, report


def collate_rows(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded sequences: the rows' first sequences, then their second ones."""
    seqs = [r["seqs"][0] for r in rows] + [r["seqs"][1] for r in rows]
    return collate([{"input_ids": ids, "labels": labels} for ids, labels in seqs], pad_id)


# ----------------------------------------------------------------------------------------------------- setup


@dataclass
class Run:
    cfg: DPOConfig
    engine: TrainEngine
    tokenizer: QwenTokenizer
    batches: MicroBatches
    eval_rows: list
    ref_logps: torch.Tensor  # (N, 2) reference log-probabilities of every row's two sequences (train + eval)
    total_steps: int
    state: TrainingState
    logger: MetricsLogger
    out_dir: Path
    throughput: Throughput
    eval_prompts: list = field(default_factory=list)  # (index, messages, ids) of data.eval_prompts
    reference: torch.nn.Module | None = None  # a frozen copy of the initial policy: the KL of eval answers
    judges: Judges | None = None
    bench_prompts: list = field(default_factory=list)  # (benchmark, item, prompt ids) of eval.benchmarks


def pack_sequences(seqs: list[tuple[list[int], list[int]]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences packed greedily, in order, into rows of at most `width` tokens with restarting position ids;
    `segments` gives each token's sequence index (-1 on padding)."""
    rows: list[list[int]] = [[]]
    for i, (ids, _) in enumerate(seqs):
        if rows[-1] and sum(len(seqs[j][0]) for j in rows[-1]) + len(ids) > width:
            rows.append([])
        rows[-1].append(i)
    length = max(sum(len(seqs[j][0]) for j in row) for row in rows)
    out = {k: torch.full((len(rows), length), fill, dtype=torch.long) for k, fill in
           (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", 0), ("segments", -1))}  # fmt: skip
    for r, row in enumerate(rows):
        at = 0
        for j in row:
            ids, labels = seqs[j]
            n = len(ids)
            out["input_ids"][r, at : at + n] = torch.tensor(ids)
            out["labels"][r, at : at + n] = torch.tensor(labels)
            out["position_ids"][r, at : at + n] = torch.arange(n)
            out["segments"][r, at : at + n] = j
            at += n
        out["position_ids"][r, at:] = torch.arange(length - at)  # padding: a dummy document of its own
    return out


def segment_logps(token_logps: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor, n: int):
    """`summed_logps` for packed rows: sums per sequence (by `segments`) → (n,), (n,)."""
    shifted, seg = labels[:, 1:], segments[:, 1:]
    mask = (shifted != IGNORE_INDEX) & (seg >= 0)
    index = seg.clamp(min=0).reshape(-1)
    logps = torch.zeros(n, device=token_logps.device).index_add(0, index, (token_logps * mask).reshape(-1))
    tokens = torch.zeros(n, device=token_logps.device, dtype=torch.long).index_add(0, index, mask.reshape(-1).long())
    return logps, tokens


def sequence_pair_logps(
    engine: TrainEngine, rows: list[dict], pad_id: int, pack_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's summed response log-probabilities (B, 2) and response token counts (B, 2) of rows; with
    `pack_to`, the 2B sequences run packed into rows of that many tokens."""
    dev = distributed.device()
    if pack_to:
        seqs = [r["seqs"][0] for r in rows] + [r["seqs"][1] for r in rows]
        batch = {k: v.to(dev, non_blocking=True) for k, v in pack_sequences(seqs, pack_to, pad_id).items()}
        out = engine.forward(batch["input_ids"], position_ids=batch["position_ids"], token_logprobs=True)
        logps, tokens = segment_logps(out.token_logprobs, batch["labels"], batch["segments"], len(seqs))
    else:
        batch = {k: v.to(dev, non_blocking=True) for k, v in collate_rows(rows, pad_id).items()}
        out = engine.forward(batch["input_ids"], token_logprobs=True)  # (2B, L-1), no (2B, L, V) logits
        logps, tokens = summed_logps(out.token_logprobs, batch["labels"])  # (2B,), (2B,)
    return logps.view(2, -1).T, tokens.view(2, -1).T


def pack_to(cfg: DPOConfig) -> int | None:
    return cfg.data.max_len if cfg.data.packing else None


def reference_logps(engine: TrainEngine, rows: list[dict], cfg: DPOConfig, pad_id: int, cache: Path) -> torch.Tensor:
    """The initial policy's log-probabilities of every row, computed before any step (every rank computes all,
    so ZeRO-3's collectives stay in step) and cached; a cache made for other rows or another model is redone."""
    digest = hashlib.sha256(repr([r["seqs"] for r in rows]).encode() + repr(cfg.model).encode()).hexdigest()
    if cache.exists():
        saved = torch.load(cache, map_location="cpu")
        if saved["digest"] == digest:
            return saved["logps"]
    engine.eval()
    out = torch.zeros(len(rows), 2)
    step = cfg.train.micro_batch_size
    with torch.no_grad():
        for i in tqdm(range(0, len(rows), step), disable=distributed.rank() != 0, desc="reference log-probs"):
            out[i : i + step] = sequence_pair_logps(engine, rows[i : i + step], pad_id, pack_to(cfg))[0].float().cpu()
    engine.train()
    if distributed.rank() == 0:
        with atomic_path(cache) as tmp:
            torch.save({"digest": digest, "logps": out}, tmp)
    return out


def setup(cfg: DPOConfig) -> Run:
    distributed.init()
    rank0 = distributed.rank() == 0
    out_dir = Path(cfg.out_dir)
    model, tokenizer = build_model(cfg.model, cfg.train.seed, distributed.device(), cfg.deepspeed)
    d, loss = cfg.data, cfg.objective.loss
    rows, report = load_rows(d.train, loss, tokenizer, d.max_len, d.on_error)
    if d.eval:
        eval_rows, _ = load_rows(d.eval, loss, tokenizer, d.max_len, d.on_error)
    else:
        rows, eval_rows = split_eval(rows, d.eval_fraction, cfg.train.seed)
    for i, r in enumerate(rows + eval_rows):  # one index space for the reference cache
        r["index"] = i
    if rank0:
        print(f"[dpo] {loss}: train data {report.summary()}; {len(eval_rows)} held out")
    loop = cfg.train
    batches = MicroBatches(rows, loop.micro_batch_size, distributed.rank(), distributed.world_size(), loop.seed)
    total_steps = loop.max_steps or math.ceil(loop.epochs * max(batches.per_epoch // loop.grad_accum, 1))
    throughput = Throughput.measured(model.config.flops_per_token(d.max_len), loop.peak_tflops, cfg.deepspeed.bf16)
    judges = Judges(cfg.eval, device=distributed.device())
    if judges and not d.eval_prompts:
        raise DataError("eval.judges score the answers to data.eval_prompts: set data.eval_prompts")
    eval_prompts, reference = [], None
    if d.eval_prompts:
        eval_prompts = generation.read_prompts(d.eval_prompts, tokenizer, d.max_prompt_len)
        if is_partitioned(model):  # built straight into ZeRO-3 partitions: the reference is built whole
            reference = build_model(cfg.model, cfg.train.seed, distributed.device())[0]
        else:
            reference = copy.deepcopy(model)  # before DeepSpeed shards the model
        reference.eval().requires_grad_(False)
    engine = TrainEngine(model, cfg.optim, cfg.deepspeed, total_steps, loop.micro_batch_size, loop.grad_accum)
    ref = torch.zeros(len(rows) + len(eval_rows), 2)
    if loss != "simpo":  # SimPO needs no reference
        out_dir.mkdir(parents=True, exist_ok=True)
        ref = reference_logps(engine, rows + eval_rows, cfg, tokenizer.pad_id, out_dir / "ref_logps.pt")
    fresh = TrainingState.start(total_steps, loop.micro_batch_size, loop.grad_accum, loop.seed)
    state, logger = open_run(cfg, out_dir, {"model": engine}, "dpo", fresh)
    if state.step:
        generation.truncate_eval_samples(out_dir, state.step)
    return Run(
        cfg, engine, tokenizer, batches, eval_rows, ref, total_steps, state, logger, out_dir, throughput,
        eval_prompts, reference, judges, benchmark_prompts(cfg.eval.benchmarks, tokenizer),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ loss


def row_losses(run: Run, rows: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row losses (B,) of the configured objective, and per-row sums for the metrics."""
    obj = run.cfg.objective
    logps, tokens = sequence_pair_logps(run.engine, rows, run.tokenizer.pad_id, pack_to(run.cfg))  # (B, 2) each
    ref = run.ref_logps[[r["index"] for r in rows]].to(logps.device)  # (B, 2)
    a, b, ra, rb, ta, tb = logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1]
    if obj.loss == "kto":
        desirable = torch.tensor([r["desirable"] for r in rows], device=logps.device)
        z0 = kto_reference_point(b, rb)
        losses, rewards = kto_loss(a, ra, desirable, z0, obj.beta, obj.kto_desirable_weight, obj.kto_undesirable_weight)
        d = desirable.float()
        return losses, {
            "rewards_desirable": (rewards * d).sum(),
            "rewards_undesirable": (rewards * (1 - d)).sum(),
            "desirable": d.sum(),
            "kl_reference_point": z0 * len(rows),
            "logps": a.detach().sum(),
        }
    if obj.loss == "ipo":
        losses, chosen_r, rejected_r = ipo_loss(a, b, ra, rb, ta, tb, obj.beta)
    elif obj.loss == "simpo":
        losses, chosen_r, rejected_r = simpo_loss(a, b, ta, tb, obj.beta, obj.simpo_gamma)
    else:
        smoothing = obj.label_smoothing if obj.loss == "cdpo" else 0.0
        losses, chosen_r, rejected_r = dpo_loss(a, b, ra, rb, obj.beta, smoothing)
    return losses, {
        "rewards_chosen": chosen_r.sum(),
        "rewards_rejected": rejected_r.sum(),
        "reward_margin": (chosen_r - rejected_r).sum(),
        "accuracy": (chosen_r > rejected_r).float().sum(),
        "logps_chosen": a.detach().sum(),
        "logps_rejected": b.detach().sum(),
        "logratio_chosen": (a - ra).detach().sum(),  # log π/π_ref on the chosen replies: the drift from the reference
        "logratio_rejected": (b - rb).detach().sum(),
    }


def averaged(sums: dict[str, float], rows: float) -> dict[str, float]:
    out = {k: v / max(rows, 1) for k, v in sums.items() if k not in ("desirable", "rows")}
    if "desirable" in sums:  # KTO's rewards are averaged over their own kind of example
        out["rewards_desirable"] = sums["rewards_desirable"] / max(sums["desirable"], 1)
        out["rewards_undesirable"] = sums["rewards_undesirable"] / max(rows - sums["desirable"], 1)
    return out


# ------------------------------------------------------------------------------------------------------ loop


def train_step(run: Run, step: int) -> dict[str, float]:
    """One optimizer step: the mean loss over every row of the global batch, whatever the micro-batch split."""
    accum = run.cfg.train.grad_accum
    micro = [run.batches.get(step * accum + i) for i in range(accum)]
    global_rows = len(micro[0]) * accum * distributed.world_size()
    tokens = sum(len(ids) for rows in micro for r in rows for ids, _ in r["seqs"])
    sums: dict[str, torch.Tensor] = {}
    stats = None
    for rows in micro:
        losses, parts = row_losses(run, rows)
        run.engine.backward(losses.sum() / global_rows)
        stats = run.engine.step() or stats
        for k, v in {"loss": losses.detach().sum(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
    totals = distributed.all_reduce_sums({**sums, "tokens": float(tokens)})
    return {**averaged(totals, global_rows), "tokens": totals["tokens"], **(stats or {})}


def evaluate(run: Run, step: int) -> dict[str, float]:
    """The objective's loss and metrics on the held-out rows (every rank evaluates all of them), and the judges
    and KL of answers sampled for data.eval_prompts."""
    out = judge_answers(run, step) if run.eval_prompts else {}
    if run.bench_prompts:
        out.update(generation.benchmark_scores(run.engine, run.tokenizer, run.bench_prompts, run.cfg.eval.benchmarks))
    if not run.eval_rows:
        return out
    run.engine.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(0, len(run.eval_rows), run.cfg.train.micro_batch_size):
            losses, parts = row_losses(run, run.eval_rows[i : i + run.cfg.train.micro_batch_size])
            for k, v in {"loss": losses.sum(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    run.engine.train()
    return {**averaged(sums, len(run.eval_rows)), **out}


@torch.no_grad()
def judge_answers(run: Run, step: int) -> dict[str, float]:
    """Sample answers to this rank's share of data.eval_prompts (fixed seeds), measure their KL to the initial
    policy, score them with the judges; eval samples written as PPO writes them."""
    g, rank, world = run.cfg.eval_generation, distributed.rank(), distributed.world_size()
    mine = run.eval_prompts[rank::world]
    run.engine.eval()
    model = generation.whole_model(run.engine)  # every rank together under ZeRO-3
    params = generation.sampling(mine, g.samples, run.cfg.train.seed, g.max_new_tokens, g.temperature, g.top_p,
                                 run.tokenizer)  # fmt: skip
    texts, answers = generation.sample_answers(model, run.tokenizer, mine, params, g.samples)
    micro, pad = run.cfg.train.micro_batch_size, run.tokenizer.pad_id
    kl_each = generation.answer_logps(model, mine, answers, g.samples, pad, micro) - generation.answer_logps(
        run.reference, mine, answers, g.samples, pad, micro
    )
    run.engine.train()
    messages = [m for _, m, _ in mine for _ in range(g.samples)]
    judged, counts = {}, {}
    if run.judges:
        references = None
        if run.judges.needs_references:
            path = run.out_dir / (f"judge_references.rank{rank}.json" if world > 1 else "judge_references.json")
            if path.exists():
                references = json.loads(path.read_text(encoding="utf-8"))
            else:  # the initial policy's answers: this evaluation's at step 0, else sampled from the reference
                references = texts if step == 0 else generation.sample_answers(
                    run.reference, run.tokenizer, mine, params, g.samples)[0]  # fmt: skip
                write_json_atomic(path, references)
        judged, counts = run.judges.score(messages, texts, references)
    sums = distributed.all_reduce_sums({**counts, "kl": float(kl_each.sum()), "answers": float(len(texts))})
    generation.write_eval_samples(run.out_dir, step, messages, texts, None, kl_each.tolist(), judged)
    return {**judge_metrics({k: v for k, v in sums.items() if k not in ("kl", "answers")}),
            "kl": sums["kl"] / max(sums["answers"], 1)}  # fmt: skip


def train(run: Run) -> dict[str, float]:
    loop = run.cfg.train
    rank0 = distributed.rank() == 0
    last_step = min(run.total_steps, loop.stop_after or run.total_steps)
    bar = tqdm(total=run.total_steps, initial=run.state.step, disable=not rank0, desc="dpo", unit="step")
    run.engine.train()
    metrics: dict[str, float] = {}
    last_eval: tuple[int, dict] = (-1, {})
    if run.state.step == 0 and loop.eval_every and (run.eval_prompts or run.bench_prompts):  # the baseline
        run.logger.log(0, evaluate(run, 0), prefix="eval/")
    for step in range(run.state.step, last_step):
        t0 = time.perf_counter()
        metrics = train_step(run, step)
        metrics.update(run.throughput(metrics["tokens"], time.perf_counter() - t0))
        done = step + 1
        if done % loop.log_every == 0 or done == last_step:
            run.logger.log(done, metrics, prefix="train/")
        if loop.eval_every and done % loop.eval_every == 0:
            last_eval = (done, evaluate(run, done))
            run.logger.log(done, last_eval[1], prefix="eval/")
        if (loop.save_every and done % loop.save_every == 0) or done == last_step:
            save(run, done)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('accuracy', float('nan')):.2f}")
        bar.update(1)
    bar.close()
    if last_step == run.total_steps and run.state.step < run.total_steps:
        final_eval = last_eval[1] if last_eval[0] == run.total_steps else evaluate(run, run.total_steps)
        if last_eval[0] != run.total_steps:
            run.logger.log(run.total_steps, final_eval, prefix="eval/")
        metrics.update({f"eval_{k}": v for k, v in final_eval.items()})
        save_from_engine(run.engine, run.engine.module.config, run.tokenizer, run.out_dir / "final", rank0)
        if rank0:
            print(f"[dpo] wrote {run.out_dir / 'final'}")
    run.logger.close()
    return metrics


def save(run: Run, step: int) -> None:
    def save_models(folder: Path) -> None:
        save_from_engine(run.engine, run.engine.module.config, run.tokenizer, folder, distributed.rank() == 0)

    state = run.state.at_step(step)
    loop = run.cfg.train
    save_checkpoint({"model": run.engine}, run.out_dir, state, save_models, loop.keep_last, loop.save_state)


def main(cfg: DPOConfig) -> dict[str, float]:
    if cfg.objective.loss != "cdpo" and "label_smoothing" in cfg.objective.model_fields_set:
        raise ConfigError("objective.label_smoothing applies to loss: cdpo only")
    return train(setup(cfg))
