"""Config sections shared by the training stages (each stage composes them into its own config type)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from align.core.config import Section


class OptimConfig(Section):
    """AdamW and the learning-rate schedule. Defaults are the Qwen report's (β 0.9/0.95, ε 1e-8)."""

    lr: float = Field(2e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine/linear decay ends at lr * min_lr_ratio


class DeepSpeedSection(Section):
    """How the model is trained: DeepSpeed ZeRO stage and offload, mixed precision."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    bf16: bool = False


class ModelSource(Section):
    """Where the model comes from: a checkpoint folder, or a model config for a fresh random initialisation."""

    init: str | None = None  # checkpoint folder (Qwen v1 or Qwen2 format)
    config: str | None = None  # model config YAML, used when init is not given
    tokenizer: str | None = None  # qwen.tiktoken path, "cl100k_base" or "bytes"; default: the checkpoint's own
    fit_vocab: bool = False  # fresh model: vocab_size = tokenizer size rounded up to 128
    dropout: float | None = None  # sets attention and embedding dropout
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (GPU speed; the first steps pay the compilation)


class LoopConfig(Section):
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; default: `epochs` passes over the data
    epochs: float = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    save_every: int = Field(0, ge=0)  # 0: only at the end
    log_every: int = Field(1, ge=1)
    keep_last: int = Field(2, ge=1)  # training-state checkpoints kept
    save_state: bool = True  # false: checkpoints hold the models only (no optimizer state; cannot resume)
    seed: int = 0
    stop_after: int | None = None  # stop (checkpointed) after this many steps without finishing the schedule
    peak_tflops: float | None = None  # one device's matmul peak for model-FLOPs utilisation; default: measured
