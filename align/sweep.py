"""`align sweep SWEEP.yaml`: grid or random search over PPO config keys on the demo world.

Every run is the demo's PPO stage (its SFT policy, reward model, prompts and ptx data) with some keys changed, in
its own folder with its resolved config. A run that finished has `result.json` and is skipped on a re-run; one
that was interrupted resumes from its last checkpoint. Each run is judged by the reward model (proxy) and by the
demo world's gold scorer, so the table shows which settings won and whether the reward was hacked.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from align.core.config import ConfigError, Section, load_config
from align.core.distributed import subprocess_env
from align.core.metrics import read_metrics
from align.core.records import write_jsonl_atomic
from base_model.atomic import write_json_atomic

ALIASES = {"seed": "train.seed", "lr": "policy_optim.lr"}


class DemoSource(Section):
    out: str = "align-demo-quick"  # the demo folder the runs share (made with `align demo` when missing)
    quick: bool = True


class SweepConfig(Section):
    demo: DemoSource = DemoSource()
    method: Literal["grid", "random"] = "grid"
    n: int = Field(4, ge=1)  # runs drawn by random search
    parameters: dict[str, list[Any]]  # dotted PPO config key (or seed, lr) -> values
    fixed: dict[str, Any] = Field(default_factory=dict)  # keys set in every run
    parallel: int = Field(1, ge=1)  # runs at once, as separate processes
    rank_by: Literal["gold", "reward"] = "gold"
    seed: int = 0
    out_dir: str = "runs/sweep"


def combinations(cfg: SweepConfig) -> list[dict[str, Any]]:
    keys = list(cfg.parameters)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(cfg.parameters[k] for k in keys))]
    if cfg.method == "random":
        grid = random.Random(cfg.seed).sample(grid, min(cfg.n, len(grid)))
    return grid


def run_name(i: int, params: dict[str, Any]) -> str:
    return f"r{i:02d}-" + "-".join(f"{k.split('.')[-1]}={v}" for k, v in params.items())


def prepare(cfg: SweepConfig, out: Path) -> list[tuple[str, dict, Path]]:
    """Resolve every run's PPO config (validated now, so a bad key fails before anything runs)."""
    from align.demo import DemoConfig, ppo_config

    demo = Path(cfg.demo.out)
    demo_cfg = DemoConfig.quick() if cfg.demo.quick else DemoConfig()
    runs = []
    for i, params in enumerate(combinations(cfg)):
        name = run_name(i, params)
        overrides = {ALIASES.get(k, k): v for k, v in {**cfg.fixed, **params}.items()}
        try:
            ppo = ppo_config(
                demo_cfg,
                demo / "sft" / "run" / "final",
                demo / "rm" / "run" / "final",
                demo / "pretrain" / "packed",
                demo / "world",
                out / name / "run",
                overrides,
            )
        except ConfigError as e:
            raise ConfigError(f"sweep run {name}: {e}") from None
        ppo = ppo.model_copy(update={"resume": True})
        runs.append((name, params, ppo))
    return runs


def run_sweep(path: str | Path, overrides: list[str] = (), log=print) -> Path:
    from align.demo import run_demo

    cfg = load_config(SweepConfig, path, overrides)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(cfg.demo.out) / "summary.json").exists():
        log(f"[sweep] the demo folder {cfg.demo.out} is not complete: running `align demo` there first")
        run_demo(Path(cfg.demo.out), quick=cfg.demo.quick)
    runs = prepare(cfg, out)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "parameters": list(cfg.parameters),
                "rank_by": cfg.rank_by,
                "n_runs": len(runs),
                "config": cfg.model_dump(),
            },
            indent=1,
        )
    )
    todo = [r for r in runs if not (out / r[0] / "result.json").exists()]
    log(
        f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run "
        f"({cfg.parallel} at a time)"
    )
    active: list[tuple[str, subprocess.Popen, float]] = []
    queue = list(todo)
    while queue or active:
        while queue and len(active) < cfg.parallel:
            name, params, ppo = queue.pop(0)
            folder = out / name
            folder.mkdir(exist_ok=True)
            (folder / "params.json").write_text(json.dumps(params))
            (folder / "config.yaml").write_text(yaml.safe_dump(ppo.model_dump(mode="json"), sort_keys=False))
            proc = subprocess.Popen(
                [sys.executable, "-m", "align.cli", "ppo", str(folder / "config.yaml")],
                stdout=open(folder / "log.txt", "ab"),
                stderr=subprocess.STDOUT,
                env=subprocess_env(),
            )
            active.append((name, proc, time.perf_counter()))
            log(f"[sweep] started {name}")
        time.sleep(0.5)
        for item in list(active):
            name, proc, t0 = item
            if proc.poll() is None:
                continue
            active.remove(item)
            if proc.returncode != 0:
                raise RuntimeError(f"sweep run {name} failed (exit {proc.returncode}); see {out / name / 'log.txt'}")
            finish_run(cfg, out / name, time.perf_counter() - t0)
            log(f"[sweep] finished {name} in {time.perf_counter() - t0:.0f} s")
    results = collect(cfg, out, [r[0] for r in runs])
    from align.report import write_report

    report = write_report(out)
    best = results[0]
    log(
        f"[sweep] best by {cfg.rank_by}: {best['run']} (gold {best['gold']:.3f}, reward {best['reward']:.3f}, "
        f"KL {best['kl']:.2f}); table {out / 'results.md'}, report {report}"
    )
    return out


def finish_run(cfg: SweepConfig, folder: Path, seconds: float) -> None:
    """Gold-score the run's held-out evaluations and write result.json (the marker of a finished run)."""
    from align.demo import gold_over_steps

    curve = gold_over_steps(folder / "run")
    write_jsonl_atomic(folder / "gold_vs_reward.jsonl", curve)
    evals = [r for r in read_metrics(folder / "run") if "eval/reward_mean" in r]
    last = evals[-1] if evals else {}
    result = {
        "run": folder.name,
        **json.loads((folder / "params.json").read_text()),
        "gold": curve[-1]["gold"] if curve else None,
        "reward": last.get("eval/reward_mean"),
        "kl": last.get("eval/kl"),
        "ptx_loss": last.get("eval/ptx_loss"),
        "seconds": seconds,
    }
    write_json_atomic(folder / "result.json", result)


def collect(cfg: SweepConfig, out: Path, names: list[str]) -> list[dict]:
    results = [json.loads((out / n / "result.json").read_text()) for n in names if (out / n / "result.json").exists()]
    results.sort(key=lambda r: -(r[cfg.rank_by] if r[cfg.rank_by] is not None else -np.inf))
    for i, r in enumerate(results, start=1):
        r["rank"] = i
    write_jsonl_atomic(out / "results.jsonl", results)
    cols = ["rank", "run", *cfg.parameters, "gold", "reward", "kl", "ptx_loss"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in results]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return results
