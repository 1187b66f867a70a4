"""The decoder's key/value cache: growing (the reference), preallocated, or static (fixed shapes, graph-safe)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, (B, G, K, D) each, plus the NTK factors chosen at prefill.

    With `max_length`, buffers are allocated once and filled in place; otherwise they grow by concatenation.
    After `start_static_decoding`, every shape and index is a tensor: each step writes one position in place
    (`position`), attends over the buffer's first `span` keys (all by default) through `key_valid`, and can be
    captured in a CUDA graph (one per span).
    """

    def __init__(self, num_layers: int, max_length: int | None = None) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.max_length = max_length
        self.length = 0
        self.ntk_alphas: list[float] | None = None
        self.position: torch.Tensor | None = None  # (1,) next write index, static decoding only
        self.next_positions: torch.Tensor | None = None  # (B, 1) position id of each row's next token
        self.key_valid: torch.Tensor | None = None  # (B, K) keys a query may attend to
        self.inv_freq: torch.Tensor | None = None  # (1 or B, R/2) rotary inverse frequencies fixed at prefill
        self.span: int | None = None  # static decoding: the step attends over the first `span` keys (None: all)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position is not None:  # static decoding: write in place, return the buffer's first `span` keys
            self.keys[layer].index_copy_(2, self.position, k)
            self.values[layer].index_copy_(2, self.position, v)
            span = self.attended()
            return self.keys[layer][:, :, :span], self.values[layer][:, :, :span]
        start, end = self.length, self.length + k.shape[2]
        if self.max_length is not None and end <= self.max_length:
            if self.keys[layer] is None:
                shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
                # zeros, not empty: a masked key's value is still multiplied by its zero weight (NaN * 0 = NaN)
                self.keys[layer] = k.new_zeros(shape)
                self.values[layer] = v.new_zeros(shape)
            self.keys[layer][:, :, start:end] = k
            self.values[layer][:, :, start:end] = v
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer][:, :, :start], k), dim=2)
            v = torch.cat((self.values[layer][:, :, :start], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        self.max_length = None  # grown past the buffer: keep concatenating from here on
        return k, v

    def attended(self) -> int:
        """Keys a static decoding step attends over: the first `span` of the buffer (the positions written so far
        and the one being written must lie within them; the rest is masked), or all of it."""
        return self.span or self.max_length

    def start_static_decoding(self, attention_mask: torch.Tensor | None, inv_freq: torch.Tensor) -> None:
        """After a prefill of `length` tokens into preallocated buffers: decode with tensor state from here on.
        attention_mask (B, length) marks the prompt's real tokens (None: all real)."""
        if self.max_length is None or self.keys[0] is None or self.keys[0].shape[2] != self.max_length:
            raise ValueError("static decoding needs a cache with preallocated buffers (max_length) after prefill")
        b, device = self.keys[0].shape[0], self.keys[0].device
        self.key_valid = torch.zeros((b, self.max_length), dtype=torch.bool, device=device)
        if attention_mask is None:
            self.key_valid[:, : self.length] = True
            self.next_positions = torch.full((b, 1), self.length, dtype=torch.long, device=device)
        else:
            self.key_valid[:, : self.length] = attention_mask.bool()
            self.next_positions = attention_mask.long().sum(-1, keepdim=True)
        self.position = torch.tensor([self.length], dtype=torch.long, device=device)
        self.inv_freq = inv_freq
