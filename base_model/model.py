"""The Qwen decoder: one model file, Hugging Face Qwen2 parameter names.

Shapes: B batch, L query length, K key length (past + L), H query heads, G key/value heads, D head dim,
R rotary dim, V vocabulary, E hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from base_model import varlen_attention
from base_model.config import QwenConfig, dynamic_ntk_alpha
from base_model.kv_cache import KVCache
from base_model.losses import linear_cross_entropy_sum
from base_model.losses import token_logprobs as logprobs_of_tokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Qwen v1's x * rsqrt(mean(x^2) + eps) in fp32, cast back, times the weight. `F.rms_norm` computes it with
        the same operations on the CPU (bitwise equal) and may fuse them into one kernel on a GPU."""
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(rotary_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """(R/2,) fp32 inverse frequencies, computed in fp32 exactly as Qwen v1 does."""
    exponents = torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim
    return 1.0 / (base**exponents)


def rope_inv_freqs(rotary_dim: int, bases: list[float], device: torch.device | None = None) -> torch.Tensor:
    """(1 or B, R/2) inverse frequencies: one row when the batch shares one base, else one per row."""
    if len(set(bases)) == 1:  # the common case: one base for the whole batch
        return rope_inv_freq(rotary_dim, bases[0], device)[None]
    return torch.stack([rope_inv_freq(rotary_dim, b, device) for b in bases])


def rope_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, bases: list[float] | None = None, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (B, L, R) in fp32; one rotary base per row (dynamic NTK picks it per row), given
    as `bases` or as their (1 or B, R/2) inverse frequencies. NeoX half-rotation layout; the sin's first half is
    negated, so that `apply_rope` rotates with one swap of halves instead of a negation and a swap."""
    if inv_freq is None:
        inv_freq = rope_inv_freqs(rotary_dim, bases, position_ids.device)
    freqs = position_ids.float()[:, :, None] * inv_freq[:, None, :]  # (B, L, R/2)
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of x (B, heads, L, D) in fp32; the rest pass through (partial rotary).

    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), computed as (x2, x1) * signed sin: the same
    products (a negation is exact), two kernels fewer."""
    r, half = cos.shape[-1], cos.shape[-1] // 2
    x_rot = (x if r == x.shape[-1] else x[..., :r]).float()
    swapped = torch.cat((x_rot[..., half:], x_rot[..., :half]), dim=-1)
    rotated = (x_rot * cos[:, None] + swapped * sin[:, None]).to(x.dtype)  # cos, sin: (B, 1, L, R)
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


def logn_factors(position_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """(B, L) LogN query scale: ln(p+1)/ln(seq_length) for 0-based positions p with p+1 > seq_length, else 1."""
    p1 = (position_ids + 1).double()
    scale = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
    return scale.float()


@dataclass
class AttentionBias:
    """What each query may attend to. `mask` is (B, 1, L, K) bool or None (then `is_causal` says plain causal)."""

    mask: torch.Tensor | None
    is_causal: bool
    window: int | None = None  # sliding-window size of this layer (None: full attention)
    documents: list[tuple[int, int, int]] | None = None  # (row, start, end) of each document, when packed rows
    # can be attended to one document at a time (no padding, no window cut inside a document)
    varlen: tuple[torch.Tensor, int] | None = None  # (cumulative document lengths, longest) for the CUDA varlen call


class QwenAttention(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        d, h, g = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, h, g, d
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, g * d, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, g * d, bias=True)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.dropout = config.attention_dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None,
        bias: AttentionBias,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, L, D)
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, L, D)
        # queries and keys rotated together: one set of elementwise kernels instead of two
        q, k = apply_rope(torch.cat((q, k), dim=1), cos, sin).split((self.num_heads, self.num_kv_heads), dim=1)
        if logn is not None:
            q = q * logn[:, None, :, None].to(q.dtype)  # after rotary, before attention (Qwen v1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, G, K, D)
        dropout = self.dropout if self.training else 0.0
        if bias.varlen is not None and (dropout == 0.0 or varlen_attention.backend(q.device, q.dtype) == "flash_attn"):
            out = varlen_attention.packed_attention(q, k, v, *bias.varlen, dropout, bias.window)
        elif bias.documents is not None:
            out = attention_by_document(q, k, v, bias.documents, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=bias.mask,
                dropout_p=dropout,
                is_causal=bias.is_causal and bias.mask is None,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (B, H, L, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))


def attention_by_document(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: list[tuple[int, int, int]], dropout: float
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, G, L, D) → (B, H, L, D): causal attention inside each (row, start, end) document of
    packed rows. The same result as the block-diagonal mask, without computing the blocks between documents (for a
    row of n equal documents, 1/n of the work) and with the causal kernel instead of an explicit mask."""
    gqa = k.shape[1] != q.shape[1]
    rows: list[list[torch.Tensor]] = [[] for _ in range(q.shape[0])]
    for row, start, end in documents:
        span = slice(start, end)
        rows[row].append(
            F.scaled_dot_product_attention(
                q[row : row + 1, :, span],
                k[row : row + 1, :, span],
                v[row : row + 1, :, span],
                dropout_p=dropout,
                is_causal=True,
                enable_gqa=gqa,
            )
        )  # (1, H, end - start, D)
    return torch.cat([torch.cat(pieces, dim=2) for pieces in rows], dim=0)


def _documents(doc_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(B, L) document ids → (row, start, end) of every document, in row then position order."""
    b, length = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    out = []
    for row, cols in enumerate(starts.tolist()):
        edges = [i for i, s in enumerate(cols) if s] + [length]
        out += [(row, s, e) for s, e in zip(edges, edges[1:])]
    return out


class QwenMLP(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # Qwen v1: w2
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # Qwen v1: w1
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # Qwen v1: c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenDecoderLayer(nn.Module):
    def __init__(self, config: QwenConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = QwenAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = QwenMLP(config)

    def forward(self, x, cos, sin, logn, bias, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, logn, bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, L, V); only the last position when called with last_only=True
    hidden_states: torch.Tensor  # (B, L, E) after the final norm
    past_key_values: KVCache | None
    loss_sum: torch.Tensor | None = None  # () summed next-token loss, when called with labels
    token_logprobs: torch.Tensor | None = None  # (B, L-1) fp32 log-probability of each next input token
    entropy: torch.Tensor | None = None  # (B, L-1) fp32 entropy of each next-token distribution


class QwenModel(nn.Module):
    """Embeddings, decoder layers and the final norm (Qwen2's `model.` prefix)."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(QwenDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """input_ids (B, L); attention_mask (B, K) with 1 for real tokens (left padding for generation);
        position_ids (B, L), restarting at 0 for each document of a packed row."""
        cfg = self.config
        b, length = input_ids.shape
        past = past_key_values.length if past_key_values is not None else 0
        packed = position_ids is not None and past == 0 and bool((position_ids[:, 1:] == 0).any())
        if position_ids is None:
            position_ids = _default_positions(b, length, past, attention_mask, input_ids.device)

        bases = self._rope_bases(b, length, past, attention_mask, past_key_values)
        cos, sin = rope_cos_sin(position_ids, cfg.rotary_dim, bases)
        if past_key_values is not None and past_key_values.inv_freq is None:
            past_key_values.inv_freq = rope_inv_freqs(cfg.rotary_dim, bases, input_ids.device)
        logn = None
        if cfg.use_logn_attn and not self.training:  # cast once here, not in every layer
            logn = logn_factors(position_ids, cfg.seq_length).to(self.embed_tokens.weight.dtype)

        doc_ids = (position_ids == 0).cumsum(-1) if packed else None  # (B, L)
        biases = _attention_biases(
            cfg, length, past, attention_mask, doc_ids, input_ids.device, self.embed_tokens.weight.dtype
        )

        x = self.embed_dropout(self.embed_tokens(input_ids))  # (B, L, E)
        for i, layer in enumerate(self.layers):
            bias = biases[cfg.window_sizes[i] if cfg.window_sizes else None]
            if cfg.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, logn, bias, past_key_values, use_reentrant=False)
            else:
                x = layer(x, cos, sin, logn, bias, past_key_values)
        if past_key_values is not None:
            past_key_values.length += length
        return self.norm(x), past_key_values

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One static decoding step: input_ids (B, 1) → hidden (B, 1, E). Every index is a tensor in `cache`
        (see `KVCache.start_static_decoding`), so the step has fixed shapes and no host synchronisation; the cache's
        position and the rows' positions advance by one. Equal to `forward` with a dynamic cache."""
        cfg = self.config
        positions = cache.next_positions  # (B, 1)
        cache.key_valid.index_fill_(1, cache.position, True)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, inv_freq=cache.inv_freq)
        dtype = self.embed_tokens.weight.dtype
        logn = None
        # LogN scales only positions past seq_length; a cache no longer than that never reaches one
        if cfg.use_logn_attn and not self.training and cache.max_length > cfg.seq_length:
            logn = logn_factors(positions, cfg.seq_length).to(dtype)
        biases = {}
        span = cache.attended()  # keys past it are neither written nor attended: not read at all
        valid = cache.key_valid[:, :span]
        k_idx = torch.arange(span, device=input_ids.device)[None]  # (1, K)
        for window in set(cfg.window_sizes or [None]):
            allowed = valid if window is None else valid & (cache.position - k_idx < window)
            # additive, in the model's dtype, once per step: attention would convert a boolean mask in every layer
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
            biases[window] = AttentionBias(mask[:, None, None, :], False, window)  # (B, 1, 1, K)
        x = self.embed_tokens(input_ids)  # (B, 1, E)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, logn, biases[cfg.window_sizes[i] if cfg.window_sizes else None], cache)
        cache.position += 1
        cache.next_positions += 1
        return self.norm(x)

    def _rope_bases(self, b, length, past, attention_mask, cache) -> list[float]:
        """The rotary base per row. Dynamic NTK picks alpha from the prefill length and keeps it while decoding."""
        cfg = self.config
        alphas = [cfg.ntk_alpha] * b
        if cfg.use_dynamic_ntk and not self.training:
            if cache is not None and past > 0 and cache.ntk_alphas is not None:
                alphas = cache.ntk_alphas
            else:
                if attention_mask is not None:
                    lengths = attention_mask.sum(-1).tolist()
                else:
                    lengths = [past + length] * b
                alphas = [max(cfg.ntk_alpha, dynamic_ntk_alpha(n, cfg.seq_length)) for n in lengths]
        if cache is not None and cache.ntk_alphas is None:
            cache.ntk_alphas = alphas
        r = cfg.rotary_dim
        return [cfg.rope_theta * a ** (r / (r - 2)) if a != 1.0 else cfg.rope_theta for a in alphas]


def _default_positions(b, length, past, attention_mask, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).expand(b, length)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: first real token at 0
    return positions[:, past : past + length]


def _attention_biases(
    cfg, length, past, attention_mask, doc_ids, device, dtype: torch.dtype = torch.float32
) -> dict[int | None, AttentionBias]:
    """One AttentionBias per distinct window size (None: full attention). Packed rows without padding take one
    varlen call per layer on CUDA (fp16/bf16), else one causal call per document where no window cuts one."""
    windows = set(cfg.window_sizes or [None])
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    whole_docs = doc_ids is not None and not has_padding and past == 0
    varlen = None
    if whole_docs and varlen_attention.backend(torch.device(device), dtype) is not None:
        varlen = varlen_attention.cu_seqlens_from_doc_ids(doc_ids)
    documents = _documents(doc_ids) if whole_docs and varlen is None else None
    out: dict[int | None, AttentionBias] = {}
    for window in windows:
        if varlen is not None:
            out[window] = AttentionBias(None, False, window, None, varlen)
            continue
        if documents is not None and (window is None or max(e - s for _, s, e in documents) <= window):
            out[window] = AttentionBias(None, False, window, documents)  # no window cuts a document
            continue
        out[window] = _mask_bias(length, past, attention_mask, doc_ids, window, has_padding, device)
    return out


def _mask_bias(length, past, attention_mask, doc_ids, window, has_padding, device) -> AttentionBias:
    """Plain causal, or an explicit (B, 1, L, K) mask for padding, windows and documents (one SDPA call)."""
    needs_window = window is not None and past + length > window
    if not (has_padding or doc_ids is not None or needs_window):
        # plain causal, or a single decoding step that may see every cached key
        return AttentionBias(mask=None, is_causal=length > 1, window=window)
    k_len = past + length
    q_idx = torch.arange(past, k_len, device=device)[:, None]  # (L, 1)
    k_idx = torch.arange(k_len, device=device)[None, :]  # (1, K)
    allowed = (k_idx <= q_idx)[None, None]  # (1, 1, L, K)
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    # a fully padded query row would softmax over nothing; let it attend anywhere (its output is unused)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return AttentionBias(allowed, False, window)


class LMHead(nn.Linear):
    """The output projection. Called with labels, it returns the summed next-token loss without materialising the
    (B, L, V) logits (see `base_model.losses`); inside this module's forward, so ZeRO-3 has gathered its weight."""

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        entropy: bool = False,
    ):  # fmt: skip
        """Logits; with `labels`, the summed loss; with `tokens`, (log-probabilities, entropies or None)."""
        if tokens is not None:
            return logprobs_of_tokens(hidden, self.weight, tokens, entropy)
        if labels is None:
            return super().forward(hidden)
        return linear_cross_entropy_sum(hidden, self.weight, labels)


class QwenForCausalLM(nn.Module):
    """Qwen language model. State-dict keys equal those of `transformers.Qwen2ForCausalLM`.

    Built on the meta device and materialised once on `device` (default: the current default device), where it is
    initialised once (`reset_parameters`); under `torch.device("meta")` it stays unmaterialised. With `seed`, the
    initialisation draws from its own generator on that device, whatever the global RNG has done before."""

    def __init__(
        self,
        config: QwenConfig,
        device: torch.device | str | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        target = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):
            self.model = QwenModel(config)
            self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if target.type != "meta":
            self.to_empty(device=target)
            if dtype is not None:
                self.to(dtype)
            self.reset_parameters(seed)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Qwen v1 initialisation (`init_parameter`), parameters drawn in `named_parameters` order from a generator
        seeded with `seed` when given."""
        self.tie_weights()
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            self.init_parameter(name, p, generator)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """One parameter's Qwen v1 initialisation: normal(0, initializer_range); output projections scaled by
        1/sqrt(2 layers); norms 1, biases 0. Drawing every parameter in `named_parameters` order from one
        generator is `reset_parameters`, whether the model is whole or materialised piece by piece."""
        std = self.config.initializer_range
        if name.endswith("bias"):
            p.zero_()
        elif "layernorm" in name or name == "model.norm.weight":
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.normal_(0.0, std / math.sqrt(2 * self.config.num_hidden_layers), generator=generator)
        else:
            p.normal_(0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        last_only: bool = False,
        labels: torch.Tensor | None = None,
        token_logprobs: bool = False,
        entropy: bool = False,
    ) -> ModelOutput:
        """With `labels` (B, L), aligned with the inputs, -100 where no loss: `loss_sum` is the summed next-token
        loss (fp32) and no logits are returned. With `token_logprobs`: `token_logprobs` (B, L-1), the log-probability
        of each input token after the first given those before it, and with `entropy` also the entropy of each of
        those distributions; no logits either (neither is ever held for the whole vocabulary)."""
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values)
        if token_logprobs:
            logprobs, entropies = self.lm_head(hidden[:, :-1], tokens=input_ids[:, 1:], entropy=entropy)
            return ModelOutput(None, hidden, cache, token_logprobs=logprobs, entropy=entropies)
        if labels is not None:
            loss_sum = self.lm_head(hidden[:, :-1], labels[:, 1:])
            return ModelOutput(logits=None, hidden_states=hidden, past_key_values=cache, loss_sum=loss_sum)
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)  # (B, L, V)
        return ModelOutput(logits=logits, hidden_states=hidden, past_key_values=cache)

    def compile_layers(self, **options) -> "QwenForCausalLM":
        """Compile each decoder layer with `torch.compile` (fused norms, rotary and SwiGLU on GPUs); the eager
        layers stay the reference the GPU tier compares against. Returns the model."""
        for layer in self.model.layers:
            layer.compile(**options)
        return self

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One static decoding step (see `QwenModel.decode`): input_ids (B, 1) → next-token logits (B, V) fp32."""
        return self.lm_head(self.model.decode(input_ids, cache))[:, -1].float()

    def new_cache(self, max_length: int | None = None) -> KVCache:
        return KVCache(self.config.num_hidden_layers, max_length)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
