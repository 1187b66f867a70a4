"""The rollout engine protocol every engine implements."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from base_model.generate import SamplingParams


@dataclass
class Rollout:
    token_ids: list[int]  # response tokens (the stop token included when one ended it)
    logprobs: list[float]  # the sampling engine's log-probability of each response token
    finish_reason: str  # "stop" or "length"


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """One response per prompt (repeat a prompt for several samples)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights, one Hugging Face-named tensor at a time."""
        ...
