"""Offline preference losses (DPO family), pure functions of per-sequence log-probabilities.

Every function takes summed log-probabilities of the response tokens, shape (B,), and returns per-example losses
(B,) and the implicit rewards it trains (B,) for logging. `logps` are the policy's, `ref_logps` the frozen
reference's (the initial policy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)]).

    With `label_smoothing` ε > 0 this is conservative DPO (cDPO, Mitchell 2023): the preference label is flipped
    with probability ε, loss = −(1−ε) log σ(βh) − ε log σ(−βh). Returns (losses, chosen_rewards, rejected_rewards)
    with rewards β(log π − log π_ref), each (B,)."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    logits = chosen_rewards - rejected_rewards  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023, eq. 17, τ = beta): (h − 1/(2τ))², h the difference of the chosen and rejected
    log-ratios, each averaged over its response tokens (the length normalisation TRL uses, confirmed with the
    authors as the form behind the paper's results). Token counts (B,)."""
    chosen_ratio = (chosen_logps - ref_chosen_logps) / chosen_tokens.clamp(min=1)
    rejected_ratio = (rejected_logps - ref_rejected_logps) / rejected_tokens.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6), no reference model: −log σ(β/|y_c| log π_c − β/|y_r| log π_r − γ), with
    target reward margin γ. Rewards are the length-normalised β log π."""
    chosen_rewards = beta * chosen_logps / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * rejected_logps / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples: with r = log π − log π_ref and the reference
    point z₀ = `kl` (a detached, non-negative estimate of KL(π‖π_ref), see `kto_reference_point`),
    desirable examples lose λ_D(1 − σ(β(r − z₀))), undesirable ones λ_U(1 − σ(β(z₀ − r))).

    logps, ref_logps (B,); desirable (B,) bool. Returns (losses, rewards β r)."""
    ratio = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach()


def kto_reference_point(mismatched_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor) -> torch.Tensor:
    """z₀: the mean log-ratio of completions paired with prompts they do not answer (KTO's biased but practical
    KL estimate), clamped at 0 and detached, as in the paper's implementation. Inputs (B,); returns a scalar."""
    return (mismatched_logps - mismatched_ref_logps).mean().clamp(min=0).detach()
