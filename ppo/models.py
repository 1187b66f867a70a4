"""The value model (critic): a reward model's backbone and head read at every position instead of one."""

from __future__ import annotations

import torch
from torch import nn

from rm.model import RewardModel


class ValueModel(nn.Module):
    RM_PREFIX = "rm."  # where the reward model's parameters sit in this module's state dict

    def __init__(self, rm: RewardModel) -> None:
        super().__init__()
        self.rm = rm

    @property
    def config(self):
        return self.rm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids → (B, L) value of the state after each token."""
        return self.rm.position_scores(input_ids, attention_mask)
