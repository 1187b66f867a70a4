"""PPO's models beside the trained policy: the value model (a reward model read at every position), where the
frozen reference and reward models live, and the rollout engine's copy of the policy."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from align.core import distributed
from align.core.engine import TrainEngine
from base_model import QwenTokenizer
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


def make_rollout_engine(cfg, actor: TrainEngine, tokenizer: QwenTokenizer):
    if cfg.ppo.engine == "vllm":
        from ppo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            cfg.models.policy, seed=cfg.train.seed, gpu_memory_utilization=cfg.ppo.vllm_gpu_memory_utilization
        )
    from ppo.rollout.native import NativeEngine

    if actor.zero_stage < 3:  # whole weights on every rank: sample from the policy itself, no second copy
        return NativeEngine.sharing(actor.module, tokenizer.pad_id)
    engine = NativeEngine(actor.module.config, tokenizer.pad_id, distributed.device(), frozen_dtype(cfg))
    engine.load_weights(actor.gathered_parameters(to_cpu=False))  # ZeRO-3 shards, one parameter at a time
    return engine


def sync_rollout_weights(rollout, actor: TrainEngine) -> None:
    """After the policy's update: the engine samples from the new weights (nothing to send when it shares them)."""
    if not getattr(rollout, "shares_weights", False):
        rollout.load_weights(actor.gathered_parameters(to_cpu=False))


def frozen_dtype(cfg) -> torch.dtype:
    """The reference and reward models (and a private rollout copy) run in bf16 on a GPU when the policy trains in
    bf16, else in fp32."""
    return torch.bfloat16 if cfg.policy_deepspeed.bf16 and distributed.device().type == "cuda" else torch.float32


@contextlib.contextmanager
def resident(model: torch.nn.Module, offload: bool):
    """A frozen model on the training device for the block; with `offload`, back on the CPU after it."""
    if offload:
        model.to(distributed.device())
    try:
        yield model
    finally:
        if offload:
            model.to("cpu")
