"""Packed rows on CUDA in one attention call: variable-length (varlen) flash attention.

The one place that imports flash-attn. Used when the tensors are on CUDA in fp16/bf16 and the row is packed (several
documents): flash-attn's `flash_attn_varlen_func` when that package imports, else PyTorch's own
`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, the same kernels). Everywhere else (the CPU, fp32) packed rows
run through `scaled_dot_product_attention`: one causal call per document (`model.attention_by_document`), or, where
padding or a window cuts into documents, one call with an explicit block-diagonal causal mask; all give the same
result.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another CUDA/torch
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # torch before 2.10
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params:  # torch 2.10 took is_causal and no window
        return None
    return varlen_attn, "enable_gqa" in params


def backend(device: torch.device, dtype: torch.dtype) -> str | None:
    """'flash_attn', 'torch' or None (no varlen kernel for this device and dtype)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    if _flash_attn() is not None:
        return "flash_attn"
    return "torch" if _torch_varlen() is not None else None


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L) document ids per row → int32 cumulative lengths over the flattened batch and the longest document
    (one host synchronisation, once per forward pass)."""
    b, length = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat_starts = starts.reshape(-1).nonzero().squeeze(-1)  # (n_docs,) start of each document in the flat batch
    cu = torch.cat((flat_starts, flat_starts.new_tensor([b * length]))).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    dropout: float,
    window: int | None,
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, G, L, D) → (B, H, L, D); causal within each document, nothing across them."""
    b, h, length, d = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(b * length, t.shape[1], d)  # (B*L, heads, D)
    window_size = (window - 1, 0) if window is not None else (-1, 0)
    if _flash_attn() is not None:
        out = _flash_attn()(
            flat(q),
            flat(k),
            flat(v),
            cu_seqlens,
            cu_seqlens,
            max_len,
            max_len,
            dropout_p=dropout,
            causal=True,
            window_size=(window - 1, 0) if window is not None else (-1, -1),
        )
    else:
        if dropout:
            raise ValueError("PyTorch's varlen attention has no dropout; the model uses it only without dropout")
        fn, has_gqa = _torch_varlen()
        if k.shape[1] != h and not has_gqa:
            k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
        extra = {"enable_gqa": True} if has_gqa and k.shape[1] != h else {}
        out = fn(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, max_len, max_len, window_size=window_size, **extra)
    return out.reshape(b, length, h, d).transpose(1, 2)  # (B, H, L, D)
