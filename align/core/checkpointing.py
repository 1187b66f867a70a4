"""Training checkpoints that hold the whole state and survive a kill.

Layout under a run's `out_dir`:

    checkpoints/step-00000040/state/    DeepSpeed model + optimizer + scheduler, client state, rng_rank{r}.pt
    checkpoints/step-00000040/hf/       the model as a Hugging Face folder
    checkpoints/latest.json             {"checkpoint": "step-00000040"}

A checkpoint is written to `checkpoints/.tmp-step-…` by every rank and renamed into place by rank 0 only after
all ranks finished, then `latest.json` is replaced atomically: a kill at any moment leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from align.core.config import ConfigError
from align.core.distributed import barrier, rank, world_size
from align.core.engine import TrainEngine, publish_checkpoint
from base_model.atomic import write_json_atomic


@dataclass
class TrainingState:
    """What a checkpoint holds besides the engines' weights, optimizer and schedule: written by every trainer and
    read back and checked on resume.

    Resuming continues the same schedule and the same data order, so it needs the same world size, micro-batch
    size, accumulation, seed and total steps; a change in any of them stops the run with the differences named
    (DeepSpeed's optimizer shards and the per-rank RNG states are laid out for one world size)."""

    step: int  # optimizer steps done (PPO: iterations)
    total_steps: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    seed: int
    samples_seen: int = 0  # rows consumed on all ranks (PPO: prompts)
    extra: dict = field(default_factory=dict)  # a trainer's own state (PPO: KL controller, reward moments)

    CHECKED = ("total_steps", "world_size", "micro_batch_size", "grad_accum", "seed")

    @classmethod
    def start(cls, total_steps: int, micro_batch_size: int, grad_accum: int, seed: int) -> "TrainingState":
        """A run's state before its first step, in this process group."""
        return cls(0, total_steps, world_size(), micro_batch_size, grad_accum, seed)

    def at_step(self, step: int, samples_per_step: int | None = None, extra: dict | None = None) -> "TrainingState":
        """The state after `step` steps; a step consumes micro_batch_size x grad_accum rows on every rank unless
        `samples_per_step` (all ranks) says otherwise."""
        per_step = samples_per_step or self.micro_batch_size * self.grad_accum * self.world_size
        return dataclasses.replace(self, step=step, samples_seen=step * per_step, extra=extra or self.extra)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TrainingState":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d) - {"samples_seen", "extra"})
        if missing:
            raise ConfigError(
                f"{where}: the checkpoint's training state lacks {', '.join(missing)} (written by an "
                "older version?); start a new run or resume=false"
            )
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_resumable_as(self, now: "TrainingState", where: str) -> None:
        diffs = [
            f"{k} {getattr(self, k)} in the checkpoint, {getattr(now, k)} now"
            for k in self.CHECKED
            if getattr(self, k) != getattr(now, k)
        ]
        if diffs:
            raise ConfigError(
                f"{where}: cannot resume: " + "; ".join(diffs) + ". Resume with the same settings, "
                "or start a new run (a new out_dir, or resume=false) from the checkpoint's hf/ folder"
            )


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MODELS_ONLY = "models_only"  # the client state's mark of a checkpoint written with train.save_state: false


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    engines: dict[str, TrainEngine],
    out_dir: Path,
    state: TrainingState,
    save_models: Callable[[Path], None] | None,
    keep_last: int,
    with_state: bool = True,
) -> Path:
    """Every rank calls this. `engines` maps a name ("model", or "policy"/"value") to its engine;
    `save_models(folder)` writes Hugging Face folders (all ranks call it; it writes from rank 0).
    `with_state=False` (`train.save_state: false`) leaves out the engines' weights, optimizer and schedule and the
    RNG states: a checkpoint of the models only, a fraction of the size, that a run cannot resume from."""
    step, client_state = state.step, {**state.to_dict(), **({} if with_state else {MODELS_ONLY: True})}
    root = Path(out_dir) / "checkpoints"
    tmp = root / f".tmp-step-{step:08d}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if with_state:
        for name, engine in engines.items():
            engine.save_state(tmp / "state" / name, client_state)
        torch.save(rng_state(), tmp / "state" / f"rng_rank{rank()}.pt")
    elif rank() == 0:
        (tmp / "state").mkdir()
    if save_models is not None:
        save_models(tmp / "hf")
    barrier()
    final = step_dir(out_dir, step)
    if rank() == 0:
        write_json_atomic(tmp / "state" / "client_state.json", client_state)
        publish_checkpoint(tmp, final, root / "latest.json", keep_last)
    barrier()
    return final


def find_checkpoint(out_dir: Path, resume: bool | str) -> Path | None:
    """`resume=true`: the latest checkpoint of this run (None if there is none yet); a path: that checkpoint or
    run folder."""
    if resume is False or resume is None:
        return None
    if resume is True:
        latest = Path(out_dir) / "checkpoints" / "latest.json"
        if not latest.exists():
            return None
        return latest.parent / json.loads(latest.read_text())["checkpoint"]
    path = Path(resume)
    if (path / "checkpoints" / "latest.json").exists():
        return find_checkpoint(path, True)
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint (no state/ folder) and not a run folder")
    return path


def load_checkpoint(engines: dict[str, TrainEngine], folder: Path) -> dict:
    """Restore every engine, this rank's RNG, and return the client state."""
    client_state: dict = {}
    for name, engine in engines.items():
        client_state = engine.load_state(folder / "state" / name)
    rng_file = folder / "state" / f"rng_rank{rank()}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{rng_file}: missing (was the checkpoint written with a different world size?)")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def open_run(cfg, out_dir: Path, engines: dict[str, TrainEngine], name: str, fresh: TrainingState):
    """Resume from `cfg.resume` if asked (checking the checkpoint against `fresh`, this run's state at step 0), open
    the metrics log (cut back to the resumed step), write the resolved config. Returns (state, logger)."""
    from align.core.config import dump_config
    from align.core.metrics import MetricsLogger

    rank0 = rank() == 0
    state = fresh
    checkpoint = find_checkpoint(out_dir, cfg.resume)
    if checkpoint is not None:
        client_state = checkpoint / "state" / "client_state.json"
        if client_state.exists():  # checked before DeepSpeed reads shards laid out for another world size
            saved_dict = json.loads(client_state.read_text())
            if saved_dict.get(MODELS_ONLY):
                raise ConfigError(
                    f"{checkpoint}: holds the models only (written with train.save_state: false), so no run can "
                    "resume from it; start a new run (a new out_dir, or resume=false) from its hf/ folder"
                )
            saved = TrainingState.from_dict(saved_dict, str(client_state))
            saved.check_resumable_as(fresh, str(checkpoint))
        state = TrainingState.from_dict(load_checkpoint(engines, checkpoint), str(checkpoint))
        if not client_state.exists():  # otherwise checked above
            state.check_resumable_as(fresh, str(checkpoint))
        if rank0:
            print(f"[{name}] resumed from {checkpoint} at step {state.step}")
    logger = MetricsLogger(out_dir, enabled=rank0)
    logger.truncate_after(state.step)
    if rank0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(out_dir) / "config.yaml")
    return state, logger
