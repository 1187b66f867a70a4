"""Language-model loss and its normalisation: the one place tokens are counted and losses are divided."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in (B, L) labels aligned with the inputs (position 0 is never a target)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of -log p(label_t | tokens < t).

    logits (B, L, V) and labels (B, L) are aligned with the inputs (Hugging Face convention): the logits at t
    predict labels at t + 1. Labels of -100 carry no loss. Returns a scalar (fp32).
    """
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(L-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(L-1),)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def normalised_loss(loss_sum: torch.Tensor, global_targets: int) -> torch.Tensor:
    """A micro-batch's share of the step's mean token loss.

    `global_targets` counts the target tokens of every micro-batch in this optimizer step on every rank, so
    summing the shares over accumulation steps and ranks gives exactly the mean over all target tokens, whatever
    the split into micro-batches, padding or packing. (The engine undoes DeepSpeed's averaging over ranks.)
    """
    return loss_sum / max(global_targets, 1)


def summed_logps(token_logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log p(label_t | tokens < t) over target tokens, and the number of target tokens, from
    (B, L-1) log-probabilities of each next token (a model's `token_logprobs`: those of its input tokens, which are
    the labels wherever there is a target) and labels (B, L) aligned with the inputs, -100 where there is no
    target. Returns two (B,) tensors (fp32 log-probabilities, integer counts)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return (token_logps * mask).sum(-1), mask.sum(-1)
