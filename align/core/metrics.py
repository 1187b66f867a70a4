"""Metrics to a JSONL file and TensorBoard, and the one throughput formula."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align.core import distributed
from align.core.records import read_appended_rows
from base_model.atomic import write_text_atomic


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def measure_peak_tflops(device: torch.device | str, bf16: bool, n: int | None = None, reps: int = 3) -> float:
    """The best of a few square matmuls in the training dtype on `device`, in TFLOP/s (a peak, not a median)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


@dataclass
class Throughput:
    """The one meaning of a trainer's speed: real (non-padding) tokens per second summed over all ranks, and
    model-FLOPs utilisation: those tokens x training FLOPs per token / (ranks x each device's matmul peak)."""

    flops_per_token: float  # forward + backward FLOPs per token of every model the step trains
    peak_tflops: float  # one device's
    world_size: int = 1

    @classmethod
    def measured(cls, flops_per_token: float, peak_tflops: float | None, bf16: bool) -> "Throughput":
        """For this process group's training device; with `peak_tflops` None, the peak is measured now (a fraction
        of a second)."""
        device = distributed.device()
        return cls(flops_per_token, peak_tflops or measure_peak_tflops(device, bf16), distributed.world_size())

    def __call__(self, real_tokens: float, seconds: float, flops: float | None = None) -> dict[str, float]:
        """`flops` (all ranks) replaces real_tokens x flops_per_token where a step trains models of two sizes."""
        rate = tokens_per_second(real_tokens, seconds)
        flops = real_tokens * self.flops_per_token if flops is None else flops
        return {"tokens_per_s": rate, "mfu": flops / seconds / (self.world_size * self.peak_tflops * 1e12)}


class MetricsLogger:
    """Appends `{"step": …, **metrics}` lines to `metrics.jsonl` and mirrors them to TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
                except ImportError:  # tensorboard not installed: JSONL only
                    self.writer = None

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(r) for r in read_appended_rows(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(l + "\n" for l in kept))

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time()}
        row.update(
            {f"{prefix}{k}": (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        )
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return read_appended_rows(path)
