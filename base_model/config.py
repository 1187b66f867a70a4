"""Model configuration for the Qwen architecture.

Field names follow Hugging Face's `Qwen2Config` where one exists, so a checkpoint's `config.json` maps onto this
type with few renames. Qwen v1 extras (dynamic NTK, LogN attention, partial rotary, training length) sit beside
them; `base_model.checkpoint` converts to and from both on-disk layouts.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, model_validator


class QwenConfig(BaseModel):
    """Shape and numerics of a Qwen decoder.

    `intermediate_size` is the SwiGLU width (Qwen2's meaning). Qwen v1 `config.json` files store twice this value;
    the checkpoint loader halves it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen v1 calls it kv_channels)
    rotary_pct: float = 1.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    seq_length: int = 8192  # the training length that dynamic NTK and LogN scaling are measured against
    max_position_embeddings: int = 32768
    use_dynamic_ntk: bool = False  # eval only, like the reference
    use_logn_attn: bool = False  # eval only, like the reference
    ntk_alpha: float = 1.0  # static NTK-aware scaling; 1.0 is off
    window_sizes: list[int | None] | None = None  # one attention window per layer (None: full); off by default
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # applied to the token embeddings, as Qwen v1's emb_dropout_prob
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> "QwenConfig":
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct={self.rotary_pct} must be in (0, 1]")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dimension {self.rotary_dim} must be even (head_dim * rotary_pct)")
        if self.window_sizes is not None and len(self.window_sizes) != self.num_hidden_layers:
            raise ValueError(
                f"window_sizes has {len(self.window_sizes)} entries; expected one per layer ({self.num_hidden_layers})"
            )
        if self.ntk_alpha < 1.0:
            raise ValueError(f"ntk_alpha={self.ntk_alpha} must be >= 1 (1 disables static NTK scaling)")
        return self

    @property
    def rotary_dim(self) -> int:
        """Number of channels per head that RoPE rotates (Qwen v1: kv_channels * rotary_pct when below 1)."""
        assert self.head_dim is not None
        if self.rotary_pct < 1.0:
            return int(self.head_dim * self.rotary_pct)
        return self.head_dim

    def num_parameters(self) -> int:
        """Parameter count, embeddings included."""
        h, f, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q = self.num_attention_heads * d
        kv = self.num_key_value_heads * d
        attn = h * q + q + 2 * (h * kv + kv) + q * h
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward, 6N plus attention), as in the PaLM appendix."""
        n = self.num_parameters() - self.vocab_size * self.hidden_size  # the embedding lookup is free
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * n + attn


def dynamic_ntk_alpha(length: int, seq_length: int) -> float:
    """Qwen v1's dynamic NTK factor: max(2**ceil(log2(L / seq_length) + 1) - 1, 1)."""
    context_value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))
