"""Answers of a policy to held-out prompts, for judges: prompt files, sampling with fixed seeds, and the weights to
sample from (the engine's own module, or a whole copy gathered from ZeRO-3 shards)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.core import distributed
from align.core.chatml import render
from align.core.losses import IGNORE_INDEX, summed_logps
from align.core.records import DataError, as_messages, iter_records, read_appended_rows
from base_model.atomic import write_text_atomic
from base_model.generate import SamplingParams, generate


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    return render(messages, tokenizer, add_generation_prompt=True)


def read_prompts(path: str, tokenizer, max_len: int) -> list[tuple[int, list[dict], list[int]]]:
    """(index, messages, prompt ids) per row; a trailing assistant message in `messages` is dropped."""
    out = []
    for where, rec in iter_records(path):
        if "prompt" in rec:
            msgs = as_messages(rec["prompt"], where)
        elif "messages" in rec:
            msgs = (
                rec["messages"][:-1]
                if rec["messages"] and rec["messages"][-1].get("role") == "assistant"
                else rec["messages"]
            )
        else:
            raise DataError(f"{where}: expected a 'prompt' or 'messages' field")
        ids = prompt_ids(msgs, tokenizer)
        if len(ids) > max_len:
            raise DataError(f"{where}: prompt of {len(ids)} tokens is longer than data.max_prompt_len={max_len}")
        out.append((len(out), msgs, ids))
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def sampling(rows: list, n: int, seed: int, max_new_tokens: int, temperature: float, top_p: float, tokenizer):
    """One seed per answer from (seed, prompt index, sample): the same answers at every evaluation for the same
    weights, whatever the number of ranks."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=(tokenizer.im_end_id, tokenizer.eod_id),
        row_seeds=[hash((seed, -1, idx, k)) % (2**62) for idx, _, _ in rows for k in range(n)],
        vocab_limit=len(tokenizer),
    )


def whole_model(engine, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A module with the engine's whole current weights: its own module below ZeRO-3, else a copy filled from the
    gathered shards (every rank must call this together)."""
    if engine.zero_stage < 3:
        return engine.module
    from base_model import QwenForCausalLM

    config = engine.module.config
    with torch.device("meta"):
        copy = QwenForCausalLM(config)
    copy = copy.to_empty(device=distributed.device()).to(dtype or torch.float32).eval()
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for name, tensor in engine.gathered_parameters(to_cpu=False):
            params[name].copy_(tensor)
    copy.tie_weights()
    return copy


@torch.no_grad()
def sample_answers(model, tokenizer, rows: list, params: SamplingParams, n: int) -> tuple[list, list[list[int]]]:
    """(texts, answer token ids) of n answers per prompt row, in row order."""
    prompts = [ids for _, _, ids in rows for _ in range(n)]
    out = generate(model, prompts, params, pad_id=tokenizer.pad_id)
    texts, answers = [], []
    for ids, reason in zip(out.token_ids, out.finish_reasons):
        ids = list(ids[:-1]) if reason == "stop" else list(ids)
        answers.append(ids)
        texts.append(tokenizer.decode(ids))
    return texts, answers


@torch.no_grad()
def answer_logps(model, rows: list, answers: list[list[int]], n: int, pad_id: int, batch: int) -> torch.Tensor:
    """Summed log-probabilities of each answer given its prompt under `model` → (len(answers),)."""
    prompts = [ids for _, _, ids in rows for _ in range(n)]
    out = []
    for i in range(0, len(answers), batch):
        pairs = list(zip(prompts[i : i + batch], answers[i : i + batch]))
        width = max(len(p) + len(a) for p, a in pairs)
        ids = [p + a + [pad_id] * (width - len(p) - len(a)) for p, a in pairs]  # right padding: causal, unseen
        labels = [[IGNORE_INDEX] * len(p) + a + [IGNORE_INDEX] * (width - len(p) - len(a)) for p, a in pairs]
        dev = distributed.device()
        token_logps = model(torch.tensor(ids, device=dev), token_logprobs=True).token_logprobs
        out.append(summed_logps(token_logps, torch.tensor(labels, device=dev))[0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def write_eval_samples(
    out_dir: Path,
    step: int,
    messages: list,
    texts: list[str],
    rewards: list[float] | None,
    kls: list[float],
    judged: dict[str, list] | None = None,
) -> None:
    """Every held-out response with its reward, KL and judges' scores, so an outside judge (a gold scorer, people)
    can score the policy at each evaluation too; one file per rank."""
    name = "eval_samples.jsonl" if distributed.world_size() == 1 else f"eval_samples.rank{distributed.rank()}.jsonl"
    judged = judged or {}
    with (out_dir / name).open("a", encoding="utf-8") as f:
        for i, (m, t, k) in enumerate(zip(messages, texts, kls)):
            row = {"step": step, "prompt": m, "response": t, "kl": k}
            if rewards is not None:
                row["reward"] = rewards[i]
            if judged:
                row["judges"] = {judge: scores[i] for judge, scores in judged.items()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def truncate_eval_samples(out_dir: Path, step: int) -> None:
    """Drop the eval samples logged after `step` (a resumed run evaluates those steps again)."""
    name = "eval_samples.jsonl" if distributed.world_size() == 1 else f"eval_samples.rank{distributed.rank()}.jsonl"
    path = out_dir / name
    if not path.exists():
        return
    keep = [r for r in read_appended_rows(path) if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))


@torch.no_grad()
def benchmark_scores(engine, tokenizer, bench_prompts: list, benchmarks: list) -> dict[str, float]:
    """Greedy answers to `eval.benchmarks` from the engine's current weights (gathered from the shards under
    ZeRO-3), each rank its share of `bench_prompts` (`align.eval.harness.benchmark_prompts`); the share answered
    right per benchmark, summed over ranks."""
    from align.eval.harness import benchmark_counts, benchmark_metrics

    mine = bench_prompts[distributed.rank() :: distributed.world_size()]
    engine.eval()
    model = whole_model(engine)
    params = SamplingParams(max_new_tokens=max(b.max_new_tokens for b in benchmarks), temperature=0.0,
                            stop_token_ids=(tokenizer.im_end_id, tokenizer.eod_id), vocab_limit=len(tokenizer))  # fmt: skip
    out = generate(model, [ids for _, _, ids in mine], params, pad_id=tokenizer.pad_id) if mine else None
    engine.train()
    texts = (
        [tokenizer.decode(t[:-1] if r == "stop" else t) for t, r in zip(out.token_ids, out.finish_reasons)]
        if out
        else []
    )
    counts = benchmark_counts(mine, texts)
    names = {b.name for b in benchmarks}
    counts = {f"{n}/{k}": counts.get(f"{n}/{k}", 0.0) for n in names for k in ("right", "n")}
    return benchmark_metrics(distributed.all_reduce_sums(counts))
