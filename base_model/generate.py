"""Batched sampling with the KV cache.

Prompts are left-padded into one batch, prefilled once, then decoded one token per step. Per-token logprobs are
those of the unmodified model distribution (temperature 1, no top-p/top-k filtering) at the chosen token, which is
what PPO needs as the behaviour policy's logprob.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from base_model.model import QwenForCausalLM
from base_model.packed_linear import prepacked_linears

PACK_FROM_STEPS = 8  # shorter generations do not repay packing the weights
ROUNDS_AT_ONCE = 4  # top-p rounds every row draws at once on a GPU (see `sample_tokens`)
KEY_ALIGN = 16  # CUDA's memory-efficient attention pads an attention mask to a multiple of 16 keys in every call
MIN_SPAN_KEYS = 256  # static steps attend over spans of the cache of this many keys at least (see `span_keys`)
MAX_SPANS = 8  # and the cache is read in at most this many spans: one CUDA graph captured for each


def row_bytes(config, dtype: torch.dtype, prompt_len: int, new_tokens: int) -> int:
    """An upper estimate of the memory one more row adds to a `generate` call (`config` is the model's
    `QwenConfig`): its KV cache (every layer's keys and values over prompt + new tokens, rounded up as a static
    cache is), the larger of a layer's attention and MLP activations over its prompt during the prefill (the
    residual stream and its norm; queries, keys and values with their rotated copies and the attention's output,
    plus a row of fp32 scores per head where a kernel materialises them; or the MLP's three intermediate tensors),
    and its last position's logits with the sampler's fp32 and fp64 copies."""
    c, size = config, dtype.itemsize
    length = -(-(prompt_len + new_tokens) // KEY_ALIGN) * KEY_ALIGN
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * length * size
    heads, kv_heads = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = (2 * c.hidden_size + 3 * heads + 4 * kv_heads) * size + c.num_attention_heads * prompt_len * 4
    mlp = (2 * c.hidden_size + 3 * c.intermediate_size) * size
    return kv + prompt_len * max(attention, mlp) + c.vocab_size * (size + 4 + 4 + 8 + 8)


def rows_that_fit(config, dtype: torch.dtype, prompt_len: int, new_tokens: int, free_bytes: int) -> int:
    """How many rows of prompts up to `prompt_len` tokens one `generate` call can sample `new_tokens` for within
    `free_bytes` (at least one): see `row_bytes`."""
    return max(1, free_bytes // row_bytes(config, dtype, prompt_len, new_tokens))


def free_device_bytes(device: torch.device) -> int:
    """Memory a CUDA device can still give: free on the device plus what torch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def draws_at_once(device: torch.device) -> bool:
    """Whether sampling takes its first rounds for all rows at once from pre-drawn uniforms (`UniformTable`): on a
    GPU, where each host synchronisation and each small launch costs; the CPU draws round by round."""
    return device.type == "cuda"


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
    stop_strings: tuple[str, ...] = ()  # end a row at the token that completes one of these (needs `decode`)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also NaN
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or more, got {self.top_k}")


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # new tokens per prompt; the stop token is included when one ended the response
    logprobs: list[list[float]]  # one per new token
    finish_reasons: list[str]  # "stop" or "length"
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (B, V) per step, when asked for
    stop_strings: list[str | None] = field(default_factory=list)  # the stop string that ended each row, if one did


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


def _uniforms(
    b: int,
    device: torch.device,
    generator: torch.Generator | None,
    row_generators: list[torch.Generator] | None,
    rows: torch.Tensor,
) -> torch.Tensor:
    """(len(rows),) float64 uniforms for the given rows: from each row's own generator when there are some (so a
    row's draws do not depend on the others), else b draws from the shared one of which the rows' are used."""
    if row_generators is not None:
        return torch.cat(
            [torch.rand(1, generator=row_generators[i], device=device, dtype=torch.float64) for i in rows.tolist()]
        )
    return torch.rand(b, generator=generator, device=device, dtype=torch.float64)[rows]


def sample_tokens(
    probs: torch.Tensor,
    generator: torch.Generator | None = None,
    row_generators: list[torch.Generator] | None = None,
    top_p: float = 1.0,
    max_rounds: int = 16,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) probabilities (not necessarily normalised) → (B,) token ids from the top-p nucleus of each row.

    One draw per row inverts the cumulative distribution (exact: a token of probability 0 is never drawn; one
    uniform number per row where torch.multinomial draws one exponential per vocabulary entry). Top-p by
    rejection: a drawn token is kept when the mass of the tokens more likely than it is below top_p of the row's
    total, i.e. when it lies in the nucleus; otherwise the row draws again. A draw from the distribution conditioned
    on the nucleus is a draw from the renormalised nucleus, so this samples exactly what a sort-and-cut sampler
    does, with about 1/top_p draws per row and no sort. Rows still rejected after `max_rounds` are cut by sorting.

    `uniforms` (B, R), when given, are every row's draws for the first R rounds, all taken at once: fixed shapes
    and no host synchronisation until the check for rows still outside the nucleus after them (the GPU's way; a
    row is then outside after R rounds with probability below (1 - top_p)^R). Later rounds draw from the
    generators, for those rows only."""
    b, v = probs.shape
    cdf = probs.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1]  # (B,)
    rounds = max_rounds if top_p < 1.0 else 1
    if uniforms is not None:
        ids, accepted = _first_in_nucleus(probs, cdf, total, uniforms[:, :rounds], top_p)
        if top_p >= 1.0:
            return ids
        pending = (~accepted).nonzero().squeeze(-1)  # the one host synchronisation
        rounds -= uniforms.shape[1]
    else:
        ids = torch.empty(b, dtype=torch.long, device=probs.device)
        pending = torch.arange(b, device=probs.device)
    for _ in range(rounds):
        if len(pending) == 0:
            return ids
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


def _first_in_nucleus(
    probs: torch.Tensor, cdf: torch.Tensor, total: torch.Tensor, uniforms: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's R draws at once: (B,) the first draw inside the nucleus (the first draw when none is), and (B,)
    whether one was."""
    v = probs.shape[-1]
    drawn = torch.searchsorted(cdf, uniforms * total[:, None], right=True).clamp_(max=v - 1)  # (B, R)
    if top_p >= 1.0:
        return drawn[:, 0], torch.ones_like(drawn[:, 0], dtype=torch.bool)
    p_drawn = probs.gather(-1, drawn)  # (B, R)
    mass_before = torch.stack(
        [torch.where(probs > p_drawn[:, r, None], probs, 0.0).sum(-1) for r in range(drawn.shape[1])], dim=1
    )  # (B, R): the mass of the tokens more likely than each draw
    inside = mass_before < top_p * total[:, None]  # (B, R)
    first = inside.to(torch.uint8).argmax(-1, keepdim=True)  # the first round inside (0 when none)
    return drawn.gather(-1, first).squeeze(-1), inside.any(-1)


class UniformTable:
    """Uniform draws for the all-rows-at-once rounds of `sample_tokens`, made `block` steps at a time: one call per
    block of steps for the shared generator, one per row for per-row generators (each row's stream still depends on
    its own generator only), instead of one per row per round per step."""

    def __init__(
        self,
        b: int,
        rounds: int,
        device: torch.device,
        generator: torch.Generator | None,
        row_generators: list[torch.Generator] | None,
        block: int = 64,
    ) -> None:
        self.b, self.rounds, self.device, self.block = b, rounds, device, block
        self.generator, self.row_generators = generator, row_generators
        self.table: torch.Tensor | None = None
        self.start = 0

    def __call__(self, step: int) -> torch.Tensor:
        """(B, R) float64 draws for `step` (steps asked in order)."""
        if self.table is None or step >= self.start + self.block:
            self.start = step
            shape, kw = (self.block, self.rounds), dict(device=self.device, dtype=torch.float64)
            if self.row_generators is not None:
                self.table = torch.stack([torch.rand(shape, generator=g, **kw) for g in self.row_generators], dim=1)
            else:
                self.table = torch.rand((self.block, self.b, self.rounds), generator=self.generator, **kw)
        return self.table[step - self.start]  # (B, R)


def span_keys(length: int) -> int:
    """How many keys a span of a static cache of `length` keys grows by: a step attends over the first multiple of
    it that holds every position written so far, not the whole buffer, so early steps read a fraction of the
    cache (the attention's keys and values are most of what a decoding step reads once the cache is longer than
    a few hundred keys). At least `MIN_SPAN_KEYS`, and at most `MAX_SPANS` spans: each is one more CUDA graph to
    capture."""
    per_span = -(-length // MAX_SPANS)
    return max(MIN_SPAN_KEYS, -(-per_span // KEY_ALIGN) * KEY_ALIGN)


def step_span(position: int, length: int, step_keys: int) -> int:
    """The keys a static step that writes `position` attends over: the first multiple of `step_keys` past it, at
    most the buffer's `length`."""
    return min(length, (position // step_keys + 1) * step_keys)


class CapturedDecoder:
    """`model.decode_step` for one batch and cache, captured in a CUDA graph per span of the cache (`span_keys`)
    and replayed at every step: one launch per token instead of one per kernel (a decoding step of a small batch
    is launch-bound in eager mode). A span's graph is captured when the first step reaches it; spans only grow,
    so the previous graph is released then."""

    def __init__(self, model: QwenForCausalLM, cache, batch: int) -> None:
        self.model, self.cache = model, cache
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
        self.span: int | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _capture(self, span: int) -> None:
        model, cache = self.model, self.cache
        cache.span = span
        saved = [t.clone() for t in (cache.position, cache.next_positions, cache.key_valid)]
        stream = torch.cuda.Stream(model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(stream):  # warm-up outside the capture: kernels chosen, workspaces allocated
            model.decode_step(self.ids, cache)
        torch.cuda.current_stream(model.device).wait_stream(stream)
        for t, old in zip((cache.position, cache.next_positions, cache.key_valid), saved):
            t.copy_(old)  # undo the warm-up's step (its keys and values are overwritten by the first replay)
        self.graph = self.logits = None  # the previous span's graph and output go back to the allocator first
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.ids, cache)  # recorded, not run
        self.span = span

    def __call__(self, ids: torch.Tensor, span: int) -> torch.Tensor:
        self.ids.copy_(ids)
        if span != self.span:
            self._capture(span)
        self.graph.replay()
        return self.logits


def static_step(model: QwenForCausalLM, cache) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """An eager static decoding step over the given span of `cache`."""

    def step(ids: torch.Tensor, span: int) -> torch.Tensor:
        cache.span = span
        return model.decode_step(ids, cache)

    return step


def _decode_mode(mode: str, device: torch.device, steps: int) -> str:
    if mode not in ("auto", "dynamic", "static", "graph"):
        raise ValueError(f"decode={mode!r}: expected auto, dynamic, static or graph")
    if mode == "auto":
        return "graph" if device.type == "cuda" and steps >= PACK_FROM_STEPS else "dynamic"
    if mode == "graph" and device.type != "cuda":
        raise ValueError("decode='graph' needs the model on a CUDA device")
    return mode


@torch.no_grad()
def generate(
    model: QwenForCausalLM,
    prompts: list[list[int]],
    sampling: SamplingParams,
    pad_id: int = 0,
    return_logits: bool = False,
    decode: str = "auto",
    detokenize: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationOutput:
    """Sample continuations of `prompts` (lists of token ids).

    `decode` chooses how tokens after the first are computed: "dynamic" (the cache grows by one key per step; the
    reference, and the CPU's default), "static" (fixed-shape steps over a preallocated cache, each attending over
    the first span of it that holds the positions written so far: `span_keys`), "graph" (static steps replayed
    from a CUDA graph per span; CUDA's default) — all give the same tokens and logprobs.

    `sampling.stop_strings` end a row at the token whose text completes one of them (that token is the row's last;
    `detokenize(ids) -> text` reads the text). `on_token(row, token_id)` is called with every new token of every
    unfinished row as it is chosen (streaming). Both read the tokens on the host every step."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if sampling.stop_strings and detokenize is None:
        raise ValueError("stop_strings need `detokenize` (the tokenizer's decode) to read the text")
    was_training = model.training
    model.eval()
    device = model.device
    mode = _decode_mode(decode, device, sampling.max_new_tokens)
    b = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    mask_arg = attention_mask if not bool(attention_mask.all()) else None

    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    row_generators = None
    if sampling.row_seeds is not None:
        if len(sampling.row_seeds) != b:
            raise ValueError(f"row_seeds has {len(sampling.row_seeds)} seeds for {b} prompts")
        row_generators = [torch.Generator(device=device).manual_seed(s) for s in sampling.row_seeds]
    table = None
    if sampling.temperature != 0 and draws_at_once(device):
        table = UniformTable(b, ROUNDS_AT_ONCE if sampling.top_p < 1.0 else 1, device, generator, row_generators)
    stop = torch.tensor(sorted(set(sampling.stop_token_ids)) or [-1], device=device)
    length = width + sampling.max_new_tokens
    if mode != "dynamic":  # static steps attend over the whole buffer: a multiple of 16 keys needs no mask padding
        length = -(-length // KEY_ALIGN) * KEY_ALIGN
    cache = model.new_cache(max_length=length)
    out_ids = torch.full((b, sampling.max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((b, sampling.max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    step_logits: list[torch.Tensor] = []
    check_every = 8 if device.type == "cuda" else 1  # a finished-check is a host synchronisation
    per_token = bool(sampling.stop_strings) or on_token is not None
    if per_token:
        check_every = 1
    longest_stop = max((len(x.encode()) for x in sampling.stop_strings), default=0)
    new_tokens: list[list[int]] = [[] for _ in range(b)]
    stop_string: list[str | None] = [None] * b
    decoder = None
    next_ids = input_ids[:, -1]  # (B,) the token each step feeds in; the first step feeds the whole prompt

    steps = 0
    with ExitStack() as stack:
        for step in range(sampling.max_new_tokens):
            if step == 1 and sampling.max_new_tokens >= PACK_FROM_STEPS:  # decoding from here: b rows per matmul
                stack.enter_context(prepacked_linears(model, rows=b))
            if step == 0:
                logits = model(input_ids, attention_mask=mask_arg, past_key_values=cache, last_only=True).logits[:, -1]
                if mode != "dynamic":
                    cache.start_static_decoding(mask_arg, cache.inv_freq)
                    step_keys = span_keys(length)
                    decoder = CapturedDecoder(model, cache, b) if mode == "graph" else static_step(model, cache)
            elif decoder is not None:  # this step writes position width + step - 1
                logits = decoder(next_ids[:, None], step_span(width + step - 1, length, step_keys))
            else:
                logits = model(
                    next_ids[:, None], attention_mask=mask_arg, past_key_values=cache, last_only=True
                ).logits[:, -1]
            logits = logits.float()  # (B, V)
            if sampling.vocab_limit is not None:
                logits[:, sampling.vocab_limit :] = float("-inf")
            if return_logits:
                step_logits.append(logits.clone())
            if sampling.temperature == 0:
                next_ids = logits.argmax(-1)
            else:
                probs = filter_logits(logits, sampling.temperature, 1.0, sampling.top_k).softmax(-1)
                uniforms = table(step) if table is not None else None
                next_ids = sample_tokens(probs, generator, row_generators, sampling.top_p, uniforms=uniforms)  # (B,)
            logprobs = logits.gather(-1, next_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)  # unfiltered, T=1
            next_ids = next_ids.masked_fill(finished, pad_id)
            out_ids[:, step] = next_ids
            out_logprobs[:, step] = logprobs
            hit = torch.isin(next_ids, stop) & ~finished
            if per_token:
                chosen, done = next_ids.tolist(), finished.tolist()
                for i in range(b):
                    if done[i]:
                        continue
                    new_tokens[i].append(chosen[i])
                    if on_token is not None:
                        on_token(i, chosen[i])
                    if sampling.stop_strings and not bool(hit[i]):
                        # a token holds at least one byte: the last longest+1 tokens hold any string just completed
                        tail = detokenize(new_tokens[i][-(longest_stop + 1) :])
                        found = next((x for x in sampling.stop_strings if x in tail), None)
                        if found is not None:
                            stop_string[i] = found
                            hit[i] = True
            stopped |= hit
            finished |= hit
            steps = step + 1
            if (steps % check_every == 0 or steps == sampling.max_new_tokens) and bool(finished.all()):
                break
            if mask_arg is not None and decoder is None:
                mask_arg = torch.cat((mask_arg, torch.ones((b, 1), dtype=mask_arg.dtype, device=device)), dim=1)

    model.train(was_training)
    token_ids, logprobs_out, reasons = [], [], []
    stop_set = set(sampling.stop_token_ids)
    all_ids, all_logprobs, all_stopped = out_ids[:, :steps].tolist(), out_logprobs[:, :steps].tolist(), stopped.tolist()
    for i in range(b):
        ids = all_ids[i]
        n = len(ids)
        if all_stopped[i] and stop_string[i] is not None:
            n = len(new_tokens[i])
        elif all_stopped[i]:
            n = next(j for j, t in enumerate(ids) if t in stop_set) + 1
        token_ids.append(ids[:n])
        logprobs_out.append(all_logprobs[i][:n])
        reasons.append("stop" if all_stopped[i] else "length")
    return GenerationOutput(token_ids, logprobs_out, reasons, step_logits, stop_string)
