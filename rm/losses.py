"""Bradley-Terry loss for reward models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss_sum(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over pairs of -log sigmoid(r_chosen - r_rejected - margin). chosen, rejected, margin: (B,)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).sum()
