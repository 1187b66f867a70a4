"""PPO maths: pure functions of tensors (torch only).

Shapes: B rows (responses), T response positions, right-padded; `mask` is 1 on real response tokens. Every
function ignores masked positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1. x, mask: (B, T); dim=None gives a scalar, dim=1 gives (B,)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over masked positions (scalar); unbiased uses n - 1."""
    mean = masked_mean(x, mask)
    sq = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        sq = sq * n / (n - 1).clamp(min=1)
    return sq


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, unbiased variance) of x over masked positions, as fp64 scalars. x, mask: same shape.

    With `all_reduce` (sums a tensor over ranks and returns it), the moments are those of every rank's values
    together: each rank contributes its count, sum and sum of squares."""
    xd, md = x.double(), mask.double()
    sums = torch.stack([md.sum(), (xd * md).sum(), (xd * xd * md).sum()])  # (3,)
    if all_reduce is not None:
        sums = all_reduce(sums)
    n, s, sq = sums.unbind()
    mean = s / n.clamp(min=1)
    var = (sq / n.clamp(min=1) - mean * mean).clamp(min=0) * n / (n - 1).clamp(min=1)
    return n, mean, var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / std over masked positions (of every rank, with `all_reduce`; see `masked_moments`); masked
    positions are set to 0. x, mask: (B, T)."""
    _, mean, var = masked_moments(x, mask, all_reduce)
    whitened = ((x - mean) * torch.rsqrt(var + eps)).to(x.dtype)
    if not shift_mean:
        whitened = whitened + mean.to(x.dtype)
    return whitened * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation on right-padded (B, T) tensors.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last response token taken as 0;
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = advantages + values), both 0 where
    masked. The recursion runs as a scan over doubling offsets: about 5 log2(T) tensor operations, where a loop
    over positions launches about 8 T small kernels on a GPU."""
    mask = response_mask.to(values.dtype)
    next_mask = F.pad(mask[:, 1:], (0, 1))  # (B, T): whether position t + 1 is a response token
    next_values = F.pad(values[:, 1:], (0, 1)) * next_mask
    delta = rewards + gamma * next_values - values
    advantages = reverse_linear_scan(delta, gamma * lam * next_mask) * mask
    return advantages, (advantages + values) * mask


def reverse_linear_scan(x: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """y_t = x_t + decay_t * y_{t+1} along the last dimension, y past the end taken as 0 (B, T each): each
    position's (decay, sum) pair is composed with the one `offset` later, for offsets 1, 2, 4, ... (Hillis and
    Steele's scan of affine maps)."""
    total, factor = x.clone(), decay.clone()
    offset, t = 1, x.shape[-1]
    while offset < t:
        total = torch.cat((total[:, :-offset] + factor[:, :-offset] * total[:, offset:], total[:, -offset:]), dim=1)
        factor = torch.cat((factor[:, :-offset] * factor[:, offset:], torch.zeros_like(factor[:, -offset:])), dim=1)
        offset *= 2
    return total


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-4) -> torch.Tensor:
    """Critic-free sequence advantages over groups of `group_size` consecutive responses to the same prompt.

    `grpo` (Shao et al. 2024, DeepSeekMath): (r_i − mean(r_group)) / (std(r_group) + eps), std unbiased, eps as
    TRL's; `rloo` (Ahmadian et al. 2024): r_i − mean of the other k−1 rewards of its group. scores (B,), B a
    multiple of group_size → (B,)."""
    groups = scores.view(-1, group_size)  # (B/k, k)
    if estimator == "grpo":
        advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    elif estimator == "rloo":
        advantages = groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    else:
        raise ValueError(f"unknown group advantage estimator {estimator!r}")
    return advantages.reshape(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimates from sampled-token log-probabilities (Schulman's k1, k2, k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(-log_ratio) - 1 + log_ratio  # k3: unbiased and non-negative


def kl_penalised_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards: -kl_coef * KL_t at every response token, plus the sequence score at the last one.

    scores (B,), logprobs/ref_logprobs/response_mask (B, T) → (rewards (B, T), kl (B, T))."""
    mask = response_mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)  # (B, T) one-hot at the last token
    rewards = rewards + last.to(rewards.dtype) * scores[:, None]
    return rewards, kl


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss max(-A r, -A clip(r, 1-e, 1+e)), r = exp(logp - logp_old).

    Returns (loss, clipped, approx_kl) per token, (B, T) each; reduce with a masked mean."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    approx_kl = 0.5 * log_ratio**2
    return loss, (clipped > unclipped).to(loss.dtype), approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    Returns (loss, clipped) per token, (B, T) each."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_sq, clipped_sq), (clipped_sq > unclipped_sq).to(values.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked positions."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
