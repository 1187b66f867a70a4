"""Metrics to a JSONL file and TensorBoard, and the one throughput formula."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


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
        kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time()}
        row.update({f"{prefix}{k}": (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in metrics.items()})
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
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
