"""Reward model: a Qwen language model plus a scalar head read at one position of each sequence.

Saved as a Hugging Face Qwen2 folder (the language model, so the backbone loads anywhere) plus
`reward_head.safetensors` and `reward_config.json` (pooling, end token, and the reward normalisation statistics).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from base_model import (
    CheckpointError,
    QwenForCausalLM,
    QwenTokenizer,
    load_pretrained,
    open_checkpoint,
    save_pretrained,
)
from base_model.atomic import write_json_atomic

Pooling = Literal["end_token", "last", "mean"]
HEAD_FILE, CONFIG_FILE = "reward_head.safetensors", "reward_config.json"


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # (B,) raw scalar rewards
    lm_loss_sum: torch.Tensor | None = None  # () summed next-token loss of the first rows, when lm_labels are given


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask → (B,) index of each row's last real token, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


class RewardModel(nn.Module):
    def __init__(
        self,
        lm: QwenForCausalLM,
        pooling: Pooling = "end_token",
        end_token_id: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        super().__init__()
        if pooling == "end_token" and end_token_id is None:
            raise ValueError("pooling='end_token' needs end_token_id")
        self.lm = lm
        self.score = nn.Linear(lm.config.hidden_size, 1, device=lm.device)
        with torch.no_grad():
            self.score.weight.normal_(0.0, 1.0 / (lm.config.hidden_size + 1) ** 0.5)
            self.score.bias.zero_()
        self.pooling, self.end_token_id = pooling, end_token_id
        self.mean, self.std = mean, std

    @property
    def config(self):
        return self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        lm_labels: torch.Tensor | None = None,
    ) -> RewardOutput:
        """input_ids (B, L); attention_mask (B, L), 1 for real tokens (either padding side);
        response_mask (B, L), 1 on response tokens (needed for pooling='mean'); lm_labels (C, L) with C <= B,
        -100 where no loss: the language-model loss of the first C rows, without materialising their logits."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, _ = self.lm.model(input_ids, attention_mask=attention_mask)  # (B, L, E)
        if self.pooling == "mean":
            if response_mask is None:
                raise ValueError("pooling='mean' needs response_mask")
            w = (response_mask * attention_mask).unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            idx = last_real_position(attention_mask)  # (B,)
            if self.pooling == "end_token":
                found = input_ids.gather(1, idx[:, None]).squeeze(1)
                if bool((found != self.end_token_id).any()):
                    raise ValueError("pooling='end_token': a sequence does not end with the reward end token")
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, E)
        rewards = self.score(pooled.to(self.score.weight.dtype)).squeeze(-1)  # (B,)
        lm_loss_sum = None
        if lm_labels is not None:
            lm_loss_sum = self.lm.lm_head(hidden[: len(lm_labels), :-1], lm_labels[:, 1:])
        return RewardOutput(rewards=rewards, lm_loss_sum=lm_loss_sum)

    def normalise(self, rewards: torch.Tensor) -> torch.Tensor:
        """Rewards standardised by the training-set statistics saved with the model."""
        return (rewards - self.mean) / max(self.std, 1e-8)

    def reward_config(self) -> dict:
        return {"pooling": self.pooling, "end_token_id": self.end_token_id, "mean": self.mean, "std": self.std}

    def position_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) the head read at every position instead of one (what a value model built from it predicts)."""
        hidden, _ = self.lm.model(input_ids, attention_mask=attention_mask)
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)

    def save(self, path: str | Path, tokenizer: QwenTokenizer | None) -> None:
        save_reward_state(self.state_dict(), self.lm.config, self.reward_config(), path, tokenizer)


def save_reward_state(
    state: dict[str, torch.Tensor],
    lm_config,
    reward_config: dict,
    path: str | Path,
    tokenizer: QwenTokenizer | None,
    prefix: str = "",
) -> None:
    """Write a reward model from a flat state dict: a `RewardModel`'s, under `prefix` where it sits inside another
    module (`rm.` in the value model), e.g. gathered from ZeRO-3 shards. The one place that knows the layout: the
    language model as a Hugging Face folder, then the head and its config beside it."""
    path = Path(path)
    with torch.device("meta"):
        lm = QwenForCausalLM(lm_config)
    lm_prefix = prefix + "lm."
    lm.load_state_dict(
        {k[len(lm_prefix) :]: v for k, v in state.items() if k.startswith(lm_prefix)},
        assign=True,
        strict=not lm_config.tie_word_embeddings,
    )
    lm.tie_weights()
    save_pretrained(lm, path, tokenizer)
    head = {name: state[f"{prefix}score.{name}"].detach().cpu().contiguous() for name in ("weight", "bias")}
    save_file(head, str(path / HEAD_FILE))
    write_json_atomic(path / CONFIG_FILE, reward_config)


def is_reward_model(path: str | Path) -> bool:
    return (Path(path) / HEAD_FILE).exists()


def open_reward_model(path: str | Path) -> tuple[RewardModel, Callable[[str, torch.Tensor], None]]:
    """The reward model of a folder on the meta device, with the function that fills one of its parameters (by
    name) from the folder: for building it piece by piece, straight into ZeRO-3 partitions
    (`align.core.engine.build_partitioned`)."""
    path = Path(path)
    if not is_reward_model(path):
        raise CheckpointError(f"{path}: no {HEAD_FILE}; not a reward model folder")
    cfg = json.loads((path / CONFIG_FILE).read_text())
    config, tensors = open_checkpoint(path)
    with torch.device("meta"):
        model = RewardModel(QwenForCausalLM(config), cfg["pooling"], cfg["end_token_id"], cfg["mean"], cfg["std"])
    head = load_file(str(path / HEAD_FILE))

    def fill(name: str, t: torch.Tensor) -> None:
        if name.startswith("lm."):
            t.copy_(tensors.get(name[len("lm.") :], t.device))
        else:
            t.copy_(head[name[len("score.") :]])

    return model, fill


def load_trained_reward_model(path: str | Path, ds, device: torch.device | str) -> RewardModel:
    """A reward-model folder to train under the DeepSpeed section `ds`: straight into partitions under ZeRO-3
    (no rank holds it whole), else whole in fp32 on `device`."""
    if ds.zero_stage != 3:
        return load_reward_model(path, device=device).train()
    from align.core.engine import build_partitioned

    model, fill = open_reward_model(path)
    return build_partitioned(model, fill, ds).train()


def load_reward_model(
    path: str | Path, dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu"
) -> RewardModel:
    """The reward model of a folder, read straight onto `device`; the head is kept in fp32 whatever `dtype`."""
    path = Path(path)
    if not is_reward_model(path):
        raise CheckpointError(f"{path}: no {HEAD_FILE}; not a reward model folder")
    cfg = json.loads((path / CONFIG_FILE).read_text())
    model = RewardModel(
        load_pretrained(path, dtype=dtype, device=device), cfg["pooling"], cfg["end_token_id"], cfg["mean"], cfg["std"]
    )
    head = load_file(str(path / HEAD_FILE), device=str(device))
    model.score.load_state_dict(head)
    return model.eval()
