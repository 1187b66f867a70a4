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

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from align.core.distributed import barrier, rank
from align.core.engine import TrainEngine, publish_checkpoint


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


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    engines: dict[str, TrainEngine],
    out_dir: Path,
    step: int,
    client_state: dict,
    save_models: Callable[[Path], None] | None,
    keep_last: int,
) -> Path:
    """Every rank calls this. `engines` maps a name ("model", or "policy"/"value") to its engine;
    `save_models(folder)` writes Hugging Face folders (all ranks call it; it writes from rank 0)."""
    root = Path(out_dir) / "checkpoints"
    tmp = root / f".tmp-step-{step:08d}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for name, engine in engines.items():
        engine.save_state(tmp / "state" / name, client_state)
    torch.save(rng_state(), tmp / "state" / f"rng_rank{rank()}.pt")
    if save_models is not None:
        save_models(tmp / "hf")
    barrier()
    final = step_dir(out_dir, step)
    if rank() == 0:
        (tmp / "state" / "client_state.json").write_text(json.dumps(_jsonable(client_state), indent=2))
        publish_checkpoint(tmp, final, root / "latest.json", keep_last)
    barrier()
    return final


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool, type(None), list))}


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


def open_run(cfg, out_dir: Path, engines: dict[str, TrainEngine], name: str):
    """Resume from `cfg.resume` if asked, open the metrics log (cut back to the resumed step), write the resolved
    config. Returns (start_step, client_state, logger)."""
    from align.core.config import dump_config
    from align.core.metrics import MetricsLogger

    rank0 = rank() == 0
    start_step, state = 0, {}
    checkpoint = find_checkpoint(out_dir, cfg.resume)
    if checkpoint is not None:
        state = load_checkpoint(engines, checkpoint)
        start_step = state["step"]
        if rank0:
            print(f"[{name}] resumed from {checkpoint} at step {start_step}")
    logger = MetricsLogger(out_dir, enabled=rank0)
    logger.truncate_after(start_step)
    if rank0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        dump_config(cfg, Path(out_dir) / "config.yaml")
    return start_step, state, logger
