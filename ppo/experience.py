"""Experience: rollouts turned into the tensors PPO trains on.

Shapes: N rollouts, L = longest prompt + response (right-padded), T = L - 1 positions that predict a next token.
Position t of a (N, T) tensor refers to the token at t + 1 of the sequence, predicted from tokens <= t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppo.rollout.engine import Rollout


@dataclass
class Experience:
    input_ids: torch.Tensor  # (N, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (N, L)
    response_mask: torch.Tensor  # (N, T) 1 where the predicted token is a response token
    old_logprobs: torch.Tensor  # (N, T) the training policy's log-probabilities (recomputed, not the engine's)
    ref_logprobs: torch.Tensor  # (N, T)
    values: torch.Tensor  # (N, T)
    rewards: torch.Tensor  # (N, T) KL-penalised token rewards
    advantages: torch.Tensor  # (N, T)
    returns: torch.Tensor  # (N, T)

    def rows(self, idx: list[int], width: int | None = None) -> "Experience":
        """The rows `idx`; with `width` (their longest sequence), without the columns past it, which hold padding
        only: a causal model's outputs at the earlier positions do not depend on them."""
        width = width or self.input_ids.shape[1]
        return Experience(
            **{
                k: v[idx][:, : width if v.shape[1] == self.input_ids.shape[1] else width - 1]
                for k, v in self.__dict__.items()
            }
        )


def build_sequences(
    prompts: list[list[int]], rollouts: list[Rollout], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (N, L), attention_mask (N, L), response_mask (N, T), engine_logprobs (N, T))."""
    n = len(rollouts)
    width = max(len(p) + len(r.token_ids) for p, r in zip(prompts, rollouts))
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width - 1), dtype=torch.float32)
    engine_logprobs = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, rollouts)):
        seq = p + r.token_ids
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        response_mask[i, len(p) - 1 : len(seq) - 1] = 1
        engine_logprobs[i, len(p) - 1 : len(seq) - 1] = torch.tensor(r.logprobs, dtype=torch.float32)
    return input_ids, attention_mask, response_mask, engine_logprobs


def length_batches(attention_mask: torch.Tensor, batch_size: int) -> list[tuple[list[int], int]]:
    """The rows of right-padded (N, L) sequences in batches of at most `batch_size` rows of similar length, longest
    first, each with its longest row's length: the columns past it are padding only, so a batch need not carry
    them. Reads the lengths on the host once."""
    lengths = attention_mask.sum(-1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [(order[i : i + batch_size], int(lengths[order[i]])) for i in range(0, len(order), batch_size)]


@torch.no_grad()
def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, T) log-probabilities of each next token under a causal LM (computed from its hidden states a chunk of
    rows at a time: no (N, T, V) logits), in batches of rows of similar length without their padding columns
    (`length_batches`). Positions past a row's end hold no meaningful value (0 or the padding's)."""
    out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, device=input_ids.device)
    for idx, width in length_batches(attention_mask, batch_size):
        ids, mask = input_ids[idx, :width], attention_mask[idx, :width]
        out[idx, : width - 1] = model(ids, attention_mask=mask, token_logprobs=True).token_logprobs.float()
    return out


@torch.no_grad()
def sequence_values(
    value_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(N, T) value estimates of the state before each predicted token, batched as `sequence_logprobs` (no
    meaningful value past a row's end)."""
    out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, device=input_ids.device)
    for idx, width in length_batches(attention_mask, batch_size):
        out[idx, : width - 1] = value_model(input_ids[idx, :width], attention_mask[idx, :width]).float()[:, :-1]
    return out


def response_text(tokenizer, rollout: Rollout) -> str:
    """The response as text, without the stop token."""
    ids = rollout.token_ids[:-1] if rollout.finish_reason == "stop" else rollout.token_ids
    return tokenizer.decode(ids)


@torch.no_grad()
def reward_scores(
    reward_model, rm_tokenizer, prompts: list[list[dict]], responses: list[str], batch_size: int, max_len: int
) -> torch.Tensor:
    """(N,) raw reward-model scores of prompt + response, rendered with the reward model's own tokenizer."""
    from rm.eval import score_texts

    return score_texts(reward_model, rm_tokenizer, list(zip(prompts, responses)), max_len, batch_size, by_length=True)


class RunningMoments:
    """Running mean and standard deviation of rewards (Chan et al. parallel update), for normalisation."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, count: float, mean: float, m2: float) -> None:
        if count == 0:
            return
        delta = mean - self.mean
        total = self.count + count
        self.mean += delta * count / total
        self.m2 += m2 + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1, 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
