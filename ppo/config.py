"""The PPO recipe's config types (`align ppo CONFIG`): models, data, the PPO settings, optimizers and DeepSpeed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from align.core.config import Section
from align.core.sections import DeepSpeedSection, LoopConfig, OptimConfig
from align.eval.judges import EvalSection
from ppo.rewards import RewardSource


class PPOModels(Section):
    policy: str  # the SFT checkpoint: initial policy and the frozen reference
    reward: str  # a reward-model folder (`align rm train`)
    reward_weight: float = 1.0  # its weight in the reward, beside ppo.extra_rewards
    value: str | None = None  # a reward-model folder to start the value model from; default: `reward`
    offload_frozen: bool = False  # keep the reference and reward models on the CPU between uses (GPU memory)


class PPOData(Section):
    prompts: str  # JSONL/Parquet rows with "prompt" (messages or text) or "messages"
    eval_prompts: str | None = None
    ptx: str | None = None  # a packed folder (`align data pack`) for the pretraining-gradient term
    ptx_eval_rows: int = Field(8, ge=0)  # rows of ptx held out to measure the alignment tax
    max_prompt_len: int = Field(1024, ge=8)


class PPOSection(Section):
    iterations: int = Field(100, ge=1)
    rollout_batch_size: int = Field(8, ge=1)  # prompts per rank per iteration
    n_samples: int = Field(2, ge=1)  # responses per prompt
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    engine: Literal["native", "vllm"] = "native"
    # rows the native engine samples at once (waves of them, shortest prompts first). Default: every row on the
    # CPU; on a GPU as many as fit in 90% of its free memory (KV cache, prefill and logits: ppo/rollout/native.py)
    generate_batch_size: int | None = Field(None, ge=1)
    vllm_gpu_memory_utilization: float = Field(0.4, gt=0, le=1)
    sync_bucket_mb: float = Field(256.0, gt=0)  # weights sent to a private engine copy per call (and gathered)
    sync_check_every: int = Field(1, ge=0)  # syncs between checks of the engine against the policy (0: never)
    sync_check_tolerance: float = Field(0.05, gt=0)  # mean |Δ log p| over the probe sequence (bf16 engines)
    ppo_epochs: int = Field(1, ge=1)
    mini_batch_size: int = Field(8, ge=1)  # rollouts per optimizer step, per rank
    # rows per forward pass when scoring rollouts (old and reference log-probabilities, values, rewards); no
    # gradients are kept, so it can exceed the training micro-batch. Default: 4 x train.micro_batch_size
    experience_batch_size: int | None = Field(None, ge=1)
    clip_range: float = 0.2
    clip_range_value: float = 0.15
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float | None = None  # set for the adaptive controller
    kl_horizon: int = 10000
    kl_in_reward: bool = True  # false: KL (k3) as a loss term weighted by kl_coef instead
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0
    ptx_batch_size: int = Field(2, ge=1)  # packed rows per micro-batch
    normalize_reward: bool = True
    reward_clip: float | None = 5.0
    no_eos_penalty: float = -1.0  # added to the reward of responses that never ended
    whiten_advantages: bool = True  # gae and rloo (reinforce_pp always whitens; grpo normalises per group)
    # gae: PPO with a value model; grpo, rloo: sequence advantages from the other responses to the same prompt
    # (n_samples >= 2); reinforce_pp: token returns whitened over the batch. The last three build no value model.
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    extra_rewards: list[RewardSource] = []  # functions and remote servers added to the reward (ppo/rewards.py)
    critic_warmup_steps: int = Field(0, ge=0)
    max_nan_steps: int = Field(3, ge=1)
    sample_every: int = Field(10, ge=1)
    eval_samples: int = Field(1, ge=1)


class PPOConfig(Section):
    models: PPOModels
    data: PPOData
    ppo: PPOSection = PPOSection()
    policy_optim: OptimConfig = OptimConfig(lr=1e-6, schedule="constant", weight_decay=0.0)
    value_optim: OptimConfig = OptimConfig(lr=5e-6, schedule="constant", weight_decay=0.0)
    policy_deepspeed: DeepSpeedSection = DeepSpeedSection()
    value_deepspeed: DeepSpeedSection = DeepSpeedSection()
    eval: EvalSection = EvalSection()  # judges of the held-out answers at every evaluation (align/eval/judges.py)
    train: LoopConfig = LoopConfig()  # micro_batch_size, seed, save_every, eval_every, log_every, keep_last
    out_dir: str = "runs/ppo"
    resume: bool | str = False
