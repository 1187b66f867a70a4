"""Linear layers with weights prepacked by oneDNN, for decoding on the CPU.

A decoding step multiplies a handful of rows (one per sequence) by every weight matrix. With the weights reordered
once into oneDNN's blocked layout, those thin matmuls run about twice as fast on CPUs where the default BLAS picks a
generic kernel (measured by `align bench generate`): the reorder is paid once per `generate` call, not per step.
Only fp32 weights on the CPU are packed, and none in a model with compiled layers; everything else runs the module's
own forward.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def available() -> bool:
    """True when this torch build can prepack linear weights with oneDNN."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        isinstance(m, nn.Linear)
        and w is not None
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.shape == (m.out_features, m.in_features)
    )  # a partitioned (ZeRO-3) weight is not whole


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) → (..., out) with a prepacked weight."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextmanager
def prepacked_linears(model: nn.Module, rows: int) -> Iterator[int]:
    """Within the block, every packable nn.Linear of `model` multiplies with a prepacked copy of its weight (tuned
    for `rows` input rows). Yields how many layers were packed. The weights must not change inside the block; the
    modules' own forwards are back on leaving it."""
    packed: list[nn.Module] = []
    # a compiled module (`compile_layers`) runs its own fused kernels, and dynamo cannot trace oneDNN's packed op
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    if available() and not torch.is_grad_enabled() and not compiled:
        for m in model.modules():
            if _packable(m):
                weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
                bias = m.bias.detach() if m.bias is not None else None
                m.forward = functools.partial(_packed_forward, weight, bias)  # instance attribute shadows the method
                packed.append(m)
    try:
        yield len(packed)
    finally:
        for m in packed:
            del m.forward
