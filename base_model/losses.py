"""The language-model loss computed from hidden states, without materialising the (B, L, V) logits.

With Qwen's 151,936-token vocabulary, fp32 logits for 4 x 2048 tokens take 5 GB, and their gradient as much again.
`linear_cross_entropy_sum` projects a chunk of rows at a time, turns each chunk's logits into its loss and its
gradients at once (softmax minus one-hot), and keeps only the (N, E) and (V, E) gradients. On CUDA, liger-kernel's
fused Triton kernel does the same when it is installed. Both equal `cross_entropy(hidden @ weight.T)` summed.

`token_logprobs` gives what PPO and DPO need instead of a loss: each row's log-probability of its token and the
entropy of its distribution, also a chunk of rows at a time; its backward pass projects each chunk again (one more
head matmul) rather than keep (N, V) of anything.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 27  # fp32 logits per chunk (512 MiB)


@functools.cache
def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # not installed, or no Triton for this device
        return None
    return liger_fused_linear_cross_entropy


def chunk_rows(vocab_size: int) -> int:
    return max(256, CHUNK_ELEMENTS // vocab_size)


def _add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (V, E) fp32 += g.T @ h, with g (C, V) and h (C, E) in the model's dtype."""
    if h.dtype == torch.float32:
        grad_w.addmm_(g.T, h)
    else:  # a bf16 matmul (fp32 accumulation inside): an fp32 one runs ~10x slower on a GPU
        grad_w.add_(g.T @ h)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (N, E) hidden rows against (V, E) weight; gradients computed in the forward pass,
    one chunk of rows at a time, and scaled by the incoming gradient in the backward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]  # (C, E)
            y = labels[start : start + rows]  # (C,)
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)
            logits = (h @ weight.T).float()  # (C, V)
            lse = logits.logsumexp(-1)  # (C,)
            picked = logits.gather(-1, target[:, None]).squeeze(-1)
            total += ((lse - picked) * valid).sum()
            if need_h or need_w:
                g = (logits - lse[:, None]).exp_()  # softmax, in place of the logits
                g.scatter_add_(-1, target[:, None], -torch.ones_like(picked)[:, None])
                g.mul_(valid[:, None])
                g = g.to(hidden.dtype)  # (C, V)
                if need_h:
                    grad_h[start : start + rows] = g @ weight
                if need_w:  # (V, E), summed over chunks in fp32
                    _add_weight_grad(grad_w, g, h)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int | None = None, fused: bool = True
) -> torch.Tensor:
    """hidden (..., E), weight (V, E), labels (...) with -100 for no loss → () fp32 sum over labelled rows of
    -log softmax(hidden @ weight.T)[label]. The rows and labels must already be aligned (shift before calling)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if fused and h.is_cuda and _liger() is not None and torch.is_grad_enabled():
        loss = _liger()(h, weight, y, ignore_index=IGNORE_INDEX, reduction="sum")
        return (loss[0] if isinstance(loss, tuple) else loss).float()
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        rows = rows or chunk_rows(weight.shape[0])
        return sum(
            (
                F.cross_entropy(
                    (h[s : s + rows] @ weight.T).float(), y[s : s + rows], ignore_index=IGNORE_INDEX, reduction="sum"
                )
                for s in range(0, h.shape[0], rows)
            ),
            torch.zeros((), device=h.device),
        )
    return _ChunkedLinearCrossEntropy.apply(h, weight, y, rows or chunk_rows(weight.shape[0]))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """(N, E) hidden rows, (V, E) weight, (N,) tokens → (N,) fp32 log softmax(hidden @ weight.T)[token] and, with
    `entropy`, (N,) fp32 entropies of the softmax (else an empty tensor). A chunk of rows at a time, in both passes."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, rows: int, entropy: bool):
        ctx.set_materialize_grads(False)  # an output the loss leaves out (the entropy) gets None, not zeros
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropies = torch.empty(n if entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, rows):
            logp = (hidden[start : start + rows] @ weight.T).float().log_softmax(-1)  # (C, V)
            logprobs[start : start + rows] = logp.gather(-1, tokens[start : start + rows, None]).squeeze(-1)
            if entropy:
                entropies[start : start + rows] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(hidden, weight, tokens)
        ctx.rows = rows
        if not entropy:
            ctx.mark_non_differentiable(entropies)
        return logprobs, entropies

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropies):
        hidden, weight, tokens = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None and grad_entropies is None:
            return None, None, None, None, None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.rows):
            h = hidden[start : start + ctx.rows]
            logp = (h @ weight.T).float().log_softmax(-1)  # (C, V), recomputed
            p = logp.exp()
            g = torch.zeros_like(logp)  # d(loss)/d(logits) of the chunk
            if grad_logprobs is not None:  # d logp[y] / dz = onehot(y) - p
                gl = grad_logprobs[start : start + ctx.rows, None]
                g.sub_(p * gl).scatter_add_(-1, tokens[start : start + ctx.rows, None], gl)
            if grad_entropies is not None:  # dH / dz = -p (logp + H)
                ent = -(p * logp).sum(-1, keepdim=True)
                g.sub_(p * (logp + ent) * grad_entropies[start : start + ctx.rows, None])
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[start : start + ctx.rows] = g @ weight
            if need_w:
                _add_weight_grad(grad_w, g, h)
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, entropy: bool = False, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden (..., E), weight (V, E), tokens (...) → log softmax(hidden @ weight.T) at each token (...) fp32, and
    with `entropy` the softmax's entropy (...) fp32 (else None); tokens aligned with the rows (shift before)."""
    shape = tokens.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropies = _ChunkedTokenLogprobs.apply(
        h, weight, tokens.reshape(-1), rows or chunk_rows(weight.shape[0]), entropy
    )
    return logprobs.reshape(shape), entropies.reshape(shape) if entropy else None
