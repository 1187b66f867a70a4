"""The one place that imports flash-attn: varlen attention for packed rows on CUDA.

Used only when the `flash_attn` package imports, the tensors are on CUDA in fp16/bf16, and the row is packed
(several documents). Everything else runs through `torch.nn.functional.scaled_dot_product_attention`: one causal
call per document (`model.attention_by_document`), or, where padding or a window cuts into documents, one call with
an explicit block-diagonal causal mask; both give the same result.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _varlen_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another CUDA/torch
        return None
    return flash_attn_varlen_func


def usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_func() is not None


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L) document ids per row → int32 cumulative lengths over the flattened batch and the longest document."""
    b, length = doc_ids.shape
    row_offset = doc_ids.amax(-1, keepdim=True).cumsum(0) - doc_ids.amax(-1, keepdim=True)  # (B, 1)
    flat = (doc_ids + row_offset).reshape(-1)  # globally increasing document ids
    counts = torch.bincount(flat - flat.min())
    counts = counts[counts > 0]
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=doc_ids.device)
    cu[1:] = counts.cumsum(0)
    return cu, int(counts.max())


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, dropout: float, window: int | None
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, G, L, D) → (B, H, L, D); causal within each document, nothing across them."""
    b, h, length, d = q.shape
    cu, max_len = cu_seqlens_from_doc_ids(doc_ids)
    flat = lambda t: t.transpose(1, 2).reshape(b * length, t.shape[1], d)  # (B*L, heads, D)
    out = _varlen_func()(
        flat(q), flat(k), flat(v), cu, cu, max_len, max_len,
        dropout_p=dropout, causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
    )  # (B*L, H, D)
    return out.reshape(b, length, h, d).transpose(1, 2)
