"""The one module that imports DeepSpeed.

`TrainEngine` wraps a model in a DeepSpeed engine (ZeRO stage 0-3, optional CPU offload, bf16) with AdamW and a
learning-rate schedule. The training loops see only this class: `backward`, `step`, `save_state`, `load_state`,
`gathered_parameters`. It runs in the process group of `align.core.distributed`: one process, or several under
`torchrun` / the `deepspeed` launcher.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from align.core import distributed
from align.core.schedule import build_scheduler
from align.core.sections import DeepSpeedSection, OptimConfig
from base_model.atomic import write_json_atomic


def _deepspeed():
    """The deepspeed module, without its CPU shared-memory all-reduce: a C++ extension that DeepSpeed's CPU
    backend compiles at its first start on a machine (half a minute or more) and sets up in every multi-rank run,
    for its inference all-reduce, which training never calls (its collectives go through torch.distributed)."""
    import deepspeed
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # a dict in every release since 0.15
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False  # read when the backend starts
    return deepspeed


def zero_section(ds: DeepSpeedSection) -> dict:
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        if ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return zero


def deepspeed_config(ds: DeepSpeedSection, optim: OptimConfig, micro_batch_size: int, grad_accum: int) -> dict:
    zero = zero_section(ds)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * distributed.world_size(),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors; a ZeRO-3 partition is judged by its full shape)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are already ZeRO-3 partitions (`build_partitioned`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def build_partitioned(
    model: torch.nn.Module,
    fill: Callable[[str, torch.Tensor], None],
    ds: DeepSpeedSection,
    bucket_bytes: int = 256 * 2**20,
) -> torch.nn.Module:
    """Materialise a model built on the meta device straight into ZeRO-3 partitions, so that no rank ever holds
    it whole: parameters are made on the training device in `named_parameters` order, filled in fp32 by
    `fill(name, tensor)` (an initialisation, or a checkpoint's tensor), cast to the training dtype, and handed to
    `deepspeed.zero.Init(module=...)` about `bucket_bytes` at a time (DeepSpeed broadcasts rank 0's values, then
    keeps each rank's partition: on the device, or on the CPU with `offload_params`). Tied parameters stay tied.
    The peak per rank is one bucket, not the model."""
    deepspeed = _deepspeed()
    if ds.zero_stage != 3:
        raise ValueError(f"building a partitioned model needs deepspeed.zero_stage=3, not {ds.zero_stage}")
    distributed.init()
    device, dtype = distributed.device(), torch.bfloat16 if ds.bf16 else torch.float32
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero_section(ds), "bf16": {"enabled": ds.bf16}}
    first: list[torch.nn.Parameter] = []

    def partition(params: list[torch.nn.Parameter]) -> None:
        if first:
            first[0].convert_to_zero_parameters(param_list=params)
            return
        holder = torch.nn.Module()
        holder.params = torch.nn.ParameterList(params)
        deepspeed.zero.Init(module=holder, config_dict_or_path=config, mem_efficient_linear=False)
        first.append(params[0])

    bucket: list[torch.nn.Parameter] = []
    size = 0
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            raise ValueError(f"build_partitioned: parameter {name} is not on the meta device")
        full = torch.empty(p.shape, device=device, dtype=torch.float32)
        fill(name, full)
        param = torch.nn.Parameter(full.to(dtype), requires_grad=p.requires_grad)
        del full
        for module, attr in owners[id(p)]:
            module._parameters[attr] = param
        bucket.append(param)
        size += param.numel() * param.element_size()
        if size >= bucket_bytes:
            partition(bucket)
            bucket, size = [], 0
    if bucket:
        partition(bucket)
    return model


def gathered_parameters(
    module: torch.nn.Module, to_cpu: bool = True, bucket_bytes: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full parameters, copied to the CPU or kept on the training device (`to_cpu=False`, for a rollout engine
    on the same GPU). ZeRO-3 shards are gathered one parameter at a time, or with `bucket_bytes` once per
    bucket of parameters of about that many bytes (fewer collectives). Every rank must iterate."""
    deepspeed = _deepspeed()

    def full_bytes(p: torch.Tensor) -> int:
        return getattr(p, "ds_numel", p.numel()) * p.element_size()

    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    params = list(module.named_parameters())
    for i, (name, p) in enumerate(params):
        bucket.append((name, p))
        size += full_bytes(p)
        if size < bucket_bytes and i + 1 < len(params):
            continue
        with deepspeed.zero.GatheredParameters([t for _, t in bucket], modifier_rank=None):
            copies = [(n, t.detach().to("cpu", copy=True) if to_cpu else t.detach().clone()) for n, t in bucket]
        yield from copies
        bucket, size = [], 0


class TrainEngine:
    """A model under DeepSpeed with AdamW and a schedule. Call `backward` per micro-batch, `step` after each."""

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        ds: DeepSpeedSection,
        total_steps: int,
        micro_batch_size: int = 1,
        grad_accum: int = 1,
    ) -> None:
        deepspeed = _deepspeed()
        distributed.init()
        if is_partitioned(model):  # built by build_partitioned: only parts added afterwards (a head) are whole
            if ds.zero_stage != 3:
                raise ValueError("a model built into ZeRO-3 partitions needs deepspeed.zero_stage=3")
            dtype = torch.bfloat16 if ds.bf16 else torch.float32
            for p in model.parameters():
                if not hasattr(p, "ds_id"):
                    p.data = p.data.to(distributed.device(), dtype)
        else:
            model = model.to(distributed.device())
        # on CUDA, torch's fused AdamW: one kernel for the whole update (not with the optimizer on the CPU)
        fused = distributed.device().type == "cuda" and not ds.offload_optimizer
        optimizer = torch.optim.AdamW(
            param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused or None
        )
        scheduler = build_scheduler(optimizer, total_steps, optim)
        config = deepspeed_config(ds, optim, micro_batch_size, grad_accum)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.zero_stage = ds.zero_stage
        self.grad_accum = grad_accum

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def zero_loss(self) -> torch.Tensor:
        """A loss with exactly zero gradient for every parameter (stands in for a non-finite one)."""
        return sum(p.sum() * 0.0 for p in self.module.parameters() if p.requires_grad)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` must already carry its share of the step (see align.core.losses.normalised_loss).

        DeepSpeed averages gradients over ranks; we undo that average so a rank's loss can be its exact share of
        the global token count, and we stop it from dividing by the accumulation steps a second time."""
        self.engine.backward(loss * distributed.world_size(), scale_wrt_gas=False)

    def step(self, skip: bool = False) -> dict[str, float] | None:
        """Advance one micro-step; at an accumulation boundary this updates the weights and returns stats.

        `skip` (the NaN guard) leaves the weights unchanged at this boundary: the update runs with a learning
        rate of 0, so DeepSpeed's micro-step bookkeeping stays in step on every rank."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if skip and boundary:
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
            self.engine.step()  # the scheduler then sets the next step's rate again
            return {"lr": 0.0, "grad_norm": float("nan"), "skipped": 1.0}
        local_norm = None
        if boundary and self.zero_stage == 0:  # DeepSpeed reports the norm only for ZeRO stages
            grads = [p.grad.detach() for p in self.module.parameters() if p.grad is not None]
            local_norm = float(torch.stack(torch._foreach_norm(grads)).float().norm()) if grads else 0.0
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        self.engine.step()
        if not boundary:
            return None
        norm = local_norm if local_norm is not None else self.engine.get_global_grad_norm()
        return {"lr": lr, "grad_norm": float(norm) if norm is not None else float("nan")}

    def gathered_parameters(self, to_cpu: bool = True, bucket_bytes: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """Full parameters (see `gathered_parameters`). Every rank must iterate."""
        if self.zero_stage == 3:
            # a parameter DeepSpeed prefetched for a module the last forward did not call (a reward model's unused
            # LM head) is still in flight; gathering it would fail: wait for it and release every parameter first
            self.engine.empty_partition_cache()
        return gathered_parameters(self.module, to_cpu, bucket_bytes)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict (all ranks call; all get it)."""
        state = dict(self.gathered_parameters())
        for name, buf in self.module.named_buffers():
            state[name] = buf.detach().cpu()
        return state

    def save_state(self, folder: Path, client_state: dict) -> None:
        """Optimizer, scheduler, model shards and `client_state` (rank 0's), written by every rank."""
        self.engine.save_checkpoint(str(folder), tag="deepspeed", client_state=client_state, save_latest=False)

    def load_state(self, folder: Path) -> dict:
        _, client_state = self.engine.load_checkpoint(str(folder), tag="deepspeed")
        if client_state is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed training state found")
        return client_state


# ---------------------------------------------------------------------------------------- checkpoint folders


def publish_checkpoint(tmp: Path, final: Path, latest_file: Path, keep_last: int) -> None:
    """Rank 0: move a fully written checkpoint into place, point `latest` at it, drop old ones."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_json_atomic(latest_file, {"checkpoint": final.name})
    steps = sorted((p for p in final.parent.glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:]))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
