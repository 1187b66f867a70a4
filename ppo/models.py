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
            cfg.models.policy,
            seed=cfg.train.seed,
            gpu_memory_utilization=cfg.ppo.vllm_gpu_memory_utilization,
            bucket_mb=cfg.ppo.sync_bucket_mb,
        )
    from ppo.rollout.native import NativeEngine

    if actor.zero_stage < 3:  # whole weights on every rank: sample from the policy itself, no second copy
        return NativeEngine.sharing(actor.module, tokenizer.pad_id, cfg.ppo.generate_batch_size)
    engine = NativeEngine(
        actor.module.config,
        tokenizer.pad_id,
        distributed.device(),
        frozen_dtype(cfg),
        max_rows=cfg.ppo.generate_batch_size,
    )
    engine.load_weights(actor.gathered_parameters(to_cpu=False, bucket_bytes=bucket_bytes(cfg)))
    return engine


def bucket_bytes(cfg) -> int:
    return int(cfg.ppo.sync_bucket_mb * 2**20)


def sync_rollout_weights(rollout, actor: TrainEngine, bucket: int = 0) -> bool:
    """After the policy's update: the engine samples from the new weights (nothing to send when it shares them);
    ZeRO-3 shards are gathered once per bucket of about `bucket` bytes. Returns whether anything was sent."""
    if getattr(rollout, "shares_weights", False):
        return False
    rollout.load_weights(actor.gathered_parameters(to_cpu=False, bucket_bytes=bucket))
    return True


class SyncCheckError(RuntimeError):
    pass


@torch.no_grad()
def check_sync(rollout, actor: TrainEngine, probe: list[int], tolerance: float, step: int) -> float:
    """Mean |log p| difference between the engine and the trained policy over a fixed probe sequence; a wrong
    weight sync stops the run here instead of training on another model's samples. Every rank calls it."""
    ids = torch.tensor([probe], device=distributed.device())
    actor.eval()
    policy = actor.forward(ids, token_logprobs=True).token_logprobs[0].cpu()
    actor.train()
    engine = torch.tensor(rollout.prompt_logprobs(probe), dtype=policy.dtype)
    diff = float((engine - policy).abs().mean())
    if not diff <= tolerance:
        raise SyncCheckError(
            f"weight sync check failed after step {step}: the rollout engine's log-probabilities of the probe "
            f"sequence differ from the trained policy's by {diff:.4f} on average (tolerance "
            f"ppo.sync_check_tolerance={tolerance}); the engine is not sampling from the policy being trained"
        )
    return diff


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
