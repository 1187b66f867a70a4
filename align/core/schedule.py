"""Learning-rate schedules: linear warmup, then cosine or linear decay to a floor, or constant."""

from __future__ import annotations

import math

import torch

from align.core.sections import OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps. Then cosine: floor + (1 - floor) * (1 + cos(pi * progress)) / 2, where
    progress runs from 0 after warmup to 1 at `total_steps`; linear likewise; constant stays at 1.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / decay_steps, 1.0)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
