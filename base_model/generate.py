"""Batched sampling with the KV cache.

Prompts are left-padded into one batch, prefilled once, then decoded one token per step. Per-token logprobs are
those of the unmodified model distribution (temperature 1, no top-p/top-k filtering) at the chosen token, which is
what PPO needs as the behaviour policy's logprob.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from base_model.model import QwenForCausalLM
from base_model.packed_linear import prepacked_linears

PACK_FROM_STEPS = 8  # shorter generations do not repay packing the weights


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filtering
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    row_seeds: list[int] | None = None  # one generator per prompt: samples then do not depend on the batch
    vocab_limit: int | None = None  # ids at or past this (embedding padding beyond the tokenizer) are never chosen


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # new tokens per prompt; the stop token is included when one ended the response
    logprobs: list[list[float]]  # one per new token
    finish_reasons: list[str]  # "stop" or "length"
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (B, V) per step, when asked for


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """(B, V) fp32 logits → temperature-scaled logits with everything outside top-k / top-p set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p: a token is kept when the
    mass of the tokens ranked before it is below top_p. `generate` samples from the same set without sorting (see
    `sample_tokens`); this is the definition, by a full sort."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (B, V) probability of all better tokens
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def _uniforms(b: int, device: torch.device, generator: torch.Generator | None,
              row_generators: list[torch.Generator] | None, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows),) float64 uniforms for the given rows: from each row's own generator when there are some (so a
    row's draws do not depend on the others), else b draws from the shared one of which the rows' are used."""
    if row_generators is not None:
        return torch.cat([torch.rand(1, generator=row_generators[i], device=device, dtype=torch.float64)
                          for i in rows.tolist()])
    return torch.rand(b, generator=generator, device=device, dtype=torch.float64)[rows]


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None,
                  row_generators: list[torch.Generator] | None = None, top_p: float = 1.0,
                  max_rounds: int = 16) -> torch.Tensor:
    """(B, V) probabilities (not necessarily normalised) → (B,) token ids from the top-p nucleus of each row.

    One draw per row inverts the cumulative distribution (exact: a token of probability 0 is never drawn; one
    uniform number per row where torch.multinomial draws one exponential per vocabulary entry). Top-p by
    rejection: a drawn token is kept when the mass of the tokens more likely than it is below top_p of the row's
    total, i.e. when it lies in the nucleus; otherwise the row draws again. A draw from the distribution conditioned
    on the nucleus is a draw from the renormalised nucleus, so this samples exactly what a sort-and-cut sampler
    does, with about 1/top_p draws per row and no sort. Rows still rejected after `max_rounds` are cut by sorting."""
    b, v = probs.shape
    cdf = probs.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1]  # (B,)
    ids = torch.empty(b, dtype=torch.long, device=probs.device)
    pending = torch.arange(b, device=probs.device)
    for _ in range(max_rounds if top_p < 1.0 else 1):
        whole = len(pending) == b  # the first round: no copies of (B, V) tensors
        u = _uniforms(b, probs.device, generator, row_generators, pending)
        drawn = torch.searchsorted(cdf if whole else cdf[pending], (u * total[pending])[:, None], right=True)
        ids[pending] = drawn.squeeze(-1).clamp_(max=v - 1)  # first cdf > u * total
        if top_p >= 1.0:
            return ids
        rows = probs if whole else probs[pending]  # (P, V)
        p_drawn = rows.gather(-1, ids[pending, None])  # (P, 1)
        mass_before = ((rows > p_drawn) * rows).sum(-1)  # (P,)
        pending = pending[mass_before >= top_p * total[pending]]
        if len(pending) == 0:
            return ids
    nucleus = filter_logits(probs[pending].log(), 1.0, top_p, 0).softmax(-1)  # (P, V)
    sub_generators = [row_generators[i] for i in pending.tolist()] if row_generators is not None else None
    ids[pending] = sample_tokens(nucleus, generator, sub_generators)
    return ids


@torch.no_grad()
def generate(
    model: QwenForCausalLM,
    prompts: list[list[int]],
    sampling: SamplingParams,
    pad_id: int = 0,
    return_logits: bool = False,
) -> GenerationOutput:
    """Sample continuations of `prompts` (lists of token ids)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    was_training = model.training
    model.eval()
    device = model.device
    b = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention_mask[i, width - len(p):] = 1
    mask_arg = attention_mask if not bool(attention_mask.all()) else None

    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    row_generators = None
    if sampling.row_seeds is not None:
        if len(sampling.row_seeds) != b:
            raise ValueError(f"row_seeds has {len(sampling.row_seeds)} seeds for {b} prompts")
        row_generators = [torch.Generator(device=device).manual_seed(s) for s in sampling.row_seeds]
    stop = torch.tensor(sorted(set(sampling.stop_token_ids)) or [-1], device=device)
    cache = model.new_cache(max_length=width + sampling.max_new_tokens)
    out_ids = torch.empty((b, 0), dtype=torch.long, device=device)
    out_logprobs = torch.empty((b, 0), dtype=torch.float32, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    step_logits: list[torch.Tensor] = []

    step_input = input_ids
    with ExitStack() as stack:
        for step in range(sampling.max_new_tokens):
            if step == 1 and sampling.max_new_tokens >= PACK_FROM_STEPS:  # decoding from here: b rows per matmul
                stack.enter_context(prepacked_linears(model, rows=b))
            logits = model(step_input, attention_mask=mask_arg, past_key_values=cache, last_only=True).logits[:, -1]
            logits = logits.float()  # (B, V)
            if sampling.vocab_limit is not None:
                logits[:, sampling.vocab_limit:] = float("-inf")
            if return_logits:
                step_logits.append(logits.clone())
            if sampling.temperature == 0:
                next_ids = logits.argmax(-1)
            else:
                probs = filter_logits(logits, sampling.temperature, 1.0, sampling.top_k).softmax(-1)
                next_ids = sample_tokens(probs, generator, row_generators, sampling.top_p)  # (B,)
            logprobs = logits.gather(-1, next_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)  # unfiltered, T=1
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
            out_ids = torch.cat((out_ids, next_ids[:, None]), dim=1)
            out_logprobs = torch.cat((out_logprobs, logprobs[:, None]), dim=1)
            hit = torch.isin(next_ids, stop) & ~finished
            stopped |= hit
            finished |= hit
            if bool(finished.all()):
                break
            step_input = next_ids[:, None]
            if mask_arg is not None:
                mask_arg = torch.cat((mask_arg, torch.ones((b, 1), dtype=mask_arg.dtype, device=device)), dim=1)

    model.train(was_training)
    token_ids, logprobs_out, reasons = [], [], []
    for i in range(b):
        ids = out_ids[i].tolist()
        n = len(ids)
        if bool(stopped[i]):
            n = next(j for j, t in enumerate(ids) if t in set(sampling.stop_token_ids)) + 1
        token_ids.append(ids[:n])
        logprobs_out.append(out_logprobs[i, :n].tolist())
        reasons.append("stop" if bool(stopped[i]) else "length")
    return GenerationOutput(token_ids, logprobs_out, reasons, step_logits)
