"""The process group: rank, world size, the training device, and sums over ranks.

A run joins the launcher's group (`torchrun`, the `deepspeed` launcher) or makes a single-process one; DeepSpeed
(`align.core.engine`) then works in that group. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as torch_dist

_OWN_ENV: dict[str, str] = {}  # what a single-process init put into os.environ


def subprocess_env() -> dict[str, str]:
    """os.environ for a child process that starts its own run: without the rank variables this process set for its
    own single-process group (harmless to a child, which makes a group of its own, but not to a launcher)."""
    return {k: v for k, v in os.environ.items() if not (k in _OWN_ENV and _OWN_ENV[k] == v)}


def init() -> None:
    """Join the launcher's process group, or make a single-process one."""
    if torch_dist.is_initialized():
        return
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if alone:  # DeepSpeed's engine reads LOCAL_RANK, vLLM's external launcher RANK and LOCAL_RANK
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            if name not in os.environ:
                os.environ[name] = _OWN_ENV[name] = "1" if name == "WORLD_SIZE" else "0"
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if alone:  # a group of one through an in-memory store: no port, so a child that inherits these makes its own
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    else:
        torch_dist.init_process_group(backend)
    atexit.register(_destroy)


def _destroy() -> None:
    """At exit: a group left standing can abort the process while the interpreter shuts down (gloo's threads:
    "terminate called without an active exception", seen as a failed rank of a finished run)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def leave(code: int) -> int:
    """The exit status `code` for a finished command; a rank of a multi-rank run ends here instead.

    Such a rank runs the exit handlers (ours, which takes the group down, and every library's), flushes its
    streams and leaves without the interpreter's own shutdown: there a thread the collective libraries leave behind
    sometimes (one run in eight or so, two gloo ranks under ZeRO-3) aborts the finished process with "terminate
    called without an active exception", and the launcher reports the whole run failed."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return code
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (in place; `t` must live on the training device: NCCL reduces GPU tensors)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t)
    return t


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (fp64 so token counts stay exact)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device())).tolist()


def all_reduce_sums(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Sum each named number (a float or a scalar tensor) over ranks in one collective and one host
    synchronisation, in fp64; every rank must pass the same names."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], device=device()).to(torch.float64).reshape(()) for k in keys])
    return dict(zip(keys, all_reduce(t).tolist()))
