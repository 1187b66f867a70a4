"""`align sweep SWEEP.yaml`: search over the dotted keys of any stage's config (PPO, DPO, SFT, RM, pretraining)
with Optuna — grid, random or Bayesian (TPE) — running trials as separate processes, several at once (one per GPU
with `gpus`), resumable after a kill.

Every trial is the base config with some keys changed, run by the stage's own command in `OUT/trial-NNN/` (its
resolved `config.yaml`, `log.txt`, the run in `run/`). The study lives in `OUT/study.db` (SQLite, Optuna's own
storage); a finished trial has `result.json`. Started again, the sweep resumes the trials that were running (from
their last checkpoints, not from scratch), asks for new ones only up to `n_trials`, and never runs a finished
trial again. Runs die with the sweep process (Linux), so a killed sweep leaves nothing running.

A trial's value is the last logged value of `metric` (by default the stage's main evaluation metric, or the gold
judge of a PPO config with `eval.judges`); where the run wrote per-answer scores (PPO's `eval_samples.jsonl`) the
value gets a bootstrap 95% interval. `results.md`/`.csv`/`.jsonl` rank the trials and `report.html` draws the
KL–reward and KL–gold frontiers across methods.

With `demo:` instead of `base:`, the base is the demo world's PPO stage (its SFT policy, reward model and data),
judged by the world's gold scorer (`align.world.demo:gold_judge`).
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from align.core.config import ConfigError, Section, apply_overrides, read_yaml, relative_note
from align.core.distributed import subprocess_env
from align.core.metrics import read_metrics
from align.core.records import read_appended_rows, write_jsonl_atomic
from base_model.atomic import write_json_atomic, write_text_atomic

STAGES = ("ppo", "dpo", "sft", "rm", "pretrain")
DEFAULT_METRIC = {  # stage -> (metric, direction)
    "ppo": ("eval/reward_mean", "maximize"),
    "dpo": ("eval/loss", "minimize"),
    "sft": ("eval/loss", "minimize"),
    "rm": ("eval/accuracy", "maximize"),
    "pretrain": ("eval/loss", "minimize"),
}


class DemoSource(Section):
    out: str = "align-demo-quick"  # the demo folder the trials share (made with `align demo` when missing)
    quick: bool = True


class Range(Section):
    low: float
    high: float
    log: bool = False
    int: bool = False  # integers from low to high
    step: float | None = None


class SweepConfig(Section):
    base: str | None = None  # a stage's config file (configs/<stage>/… or your own)
    stage: Literal["ppo", "dpo", "sft", "rm", "pretrain"] | None = None  # default: the base file's folder name
    demo: DemoSource | None = None  # instead of base: the demo world's PPO stage, judged by its gold scorer
    method: Literal["grid", "random", "tpe"] = "grid"
    n_trials: int | None = Field(None, ge=1)  # default: the grid's size (grid) or 8
    parameters: dict[str, list[Any] | Range]  # dotted config key (or seed, lr) -> values (or a range)
    fixed: dict[str, Any] = Field(default_factory=dict)  # keys set in every trial
    parallel: int = Field(1, ge=1)  # trials at once, as separate processes
    gpus: list[int] | Literal["auto"] | None = None  # one trial per GPU (sets CUDA_VISIBLE_DEVICES); auto: all
    metric: str | None = None  # the logged metric trials are ranked by; default by stage
    direction: Literal["maximize", "minimize"] | None = None
    seed: int = 0
    out_dir: str = "runs/sweep"

    def stage_name(self) -> str:
        if self.demo is not None:
            return "ppo"
        if self.stage:
            return self.stage
        if self.base is not None and not Path(self.base).is_file():
            raise ConfigError(f"sweep: base {self.base}: config file not found{relative_note(self.base)}")
        folder = Path(self.base).parent.name
        if folder not in STAGES:
            raise ConfigError(
                f"sweep: set `stage` ({' | '.join(STAGES)}); the base {self.base} is not in configs/<stage>/"
            )
        return folder

    def grid_size(self) -> int | None:
        if any(isinstance(v, Range) for v in self.parameters.values()):
            return None
        return int(np.prod([len(v) for v in self.parameters.values()]))


def aliases(stage: str) -> dict[str, str]:
    return {"seed": "train.seed", "lr": "policy_optim.lr" if stage == "ppo" else "optim.lr"}


# ---------------------------------------------------------------------------------------------------- configs


def base_data(cfg: SweepConfig) -> dict:
    """The base config as a dict: the file's, or the demo world's PPO stage with its gold judge."""
    if cfg.demo is not None:
        from align.demo import DemoConfig, ppo_config

        demo = Path(cfg.demo.out)
        ppo = ppo_config(
            DemoConfig.quick() if cfg.demo.quick else DemoConfig(),
            demo / "sft" / "run" / "final",
            demo / "rm" / "run" / "final",
            demo / "pretrain" / "packed",
            demo / "world",
            Path("unset"),
        )
        return ppo.model_dump(mode="json")
    if cfg.base is None:
        raise ConfigError("sweep: give `base` (a stage's config file) or `demo`")
    return read_yaml(cfg.base)


def config_class(stage: str) -> type:
    from align.config_types import CONFIG_TYPES

    return CONFIG_TYPES[stage]


def trial_config(cfg: SweepConfig, base: dict, params: dict[str, Any], folder: Path):
    """The trial's validated config: base + fixed + params, its run in `folder/run`, resumable."""
    stage = cfg.stage_name()
    data = json.loads(json.dumps(base))
    keys = {aliases(stage).get(k, k): v for k, v in {**cfg.fixed, **params}.items()}
    apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in keys.items()])
    data.update({"out_dir": str(folder / "run"), "resume": True})
    try:
        return config_class(stage).model_validate(data)
    except Exception as e:
        raise ConfigError(f"sweep trial {folder.name} ({params}): {e}") from None


def default_metric(cfg: SweepConfig, base: dict) -> tuple[str, str]:
    stage = cfg.stage_name()
    metric, direction = DEFAULT_METRIC[stage]
    if cfg.metric is None and stage == "ppo":
        from align.eval.judges import EvalSection

        gold = EvalSection.model_validate(base.get("eval") or {}).gold_name()
        if gold:
            metric = f"eval/judge/{gold}"
    return cfg.metric or metric, cfg.direction or direction


# ------------------------------------------------------------------------------------------------------ optuna


def distributions(cfg: SweepConfig) -> dict:
    import optuna.distributions as d

    out = {}
    for key, spec in cfg.parameters.items():
        if isinstance(spec, Range):
            if spec.int:
                out[key] = d.IntDistribution(int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
            else:
                out[key] = d.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
        else:
            if not spec:
                raise ConfigError(f"sweep: parameters.{key} lists no values")
            out[key] = d.CategoricalDistribution(spec)
    return out


def _grid_sampler():
    import optuna

    class AskTellGrid(optuna.samplers.GridSampler):
        """Optuna's grid for ask/tell: its `after_trial` stops `study.optimize` when the grid is used up, which is
        an error outside `optimize`; here the sweep counts the trials itself."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return AskTellGrid


def open_study(cfg: SweepConfig, out: Path, direction: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    AskTellGrid = _grid_sampler()
    if cfg.method == "grid":
        if cfg.grid_size() is None:
            raise ConfigError("sweep: method grid takes lists of values, not ranges (use random or tpe)")
        sampler = AskTellGrid(dict(cfg.parameters), seed=cfg.seed)
    elif cfg.method == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(4, cfg.n_trials or 8))
    return optuna.create_study(
        storage=f"sqlite:///{out / 'study.db'}",
        study_name="sweep",
        sampler=sampler,
        direction=direction,
        load_if_exists=True,
    )


def suggest(trial, name: str, dist) -> None:
    """Draw one parameter of `trial` from its distribution (Optuna's public suggest calls)."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        trial.suggest_categorical(name, dist.choices)
    elif isinstance(dist, d.IntDistribution):
        trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    else:
        trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def abandoned(t) -> bool:
    return bool(t.user_attrs.get("abandoned"))


def interrupted_trials(study, dists: dict, out: Path) -> list[tuple[int, dict]]:
    """The trials an earlier sweep process left RUNNING: those with a result are recorded; the others are resumed
    (their runs continue from their checkpoints). A trial the kill caught inside `ask`, before all its parameters
    were drawn, gets the rest drawn now; if that cannot be done it is marked failed and `abandoned` (not counted)."""
    import optuna
    from optuna.trial import TrialState

    queue: list[tuple[int, dict]] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        folder = out / trial_name(t.number)
        if (folder / "result.json").exists():
            study.tell(t.number, json.loads((folder / "result.json").read_text())["value"])
            continue
        params = dict(t.params)
        if set(params) != set(dists):
            trial = optuna.trial.Trial(study, t._trial_id)
            try:
                for name, dist in dists.items():
                    if name not in params:
                        suggest(trial, name, dist)
            except Exception:  # the sampler cannot finish this trial: leave it out of the count
                trial.set_user_attr("abandoned", True)
                study.tell(t.number, state=TrialState.FAIL)
                continue
            params = dict(trial.params)
        wait_for_orphan(folder)
        queue.append((t.number, params))
    return queue


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


# ------------------------------------------------------------------------------------------------------ running


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the sweep process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def stage_command(stage: str, config) -> list[str]:
    if stage == "rm":
        return ["rm", "pmp" if config.stage == "pmp" else "train"]
    return [stage]


def gpu_slots(cfg: SweepConfig) -> list[str | None]:
    """One slot per GPU (its CUDA_VISIBLE_DEVICES) with `gpus`, else `parallel` CPU slots."""
    gpus = cfg.gpus
    if gpus == "auto":
        import torch

        gpus = list(range(torch.cuda.device_count()))
        if not gpus:
            return [None] * cfg.parallel
    if gpus:
        return [str(g) for g in gpus]
    return [None] * cfg.parallel


def wait_for_orphan(folder: Path, timeout: float = 120.0) -> None:
    """A run left by an earlier sweep process (still exiting after SIGTERM) must end before it is resumed."""
    pid_file = folder / "pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    cmdline = Path(f"/proc/{pid}/cmdline")
    deadline = time.time() + timeout
    while cmdline.exists() and str(folder / "config.yaml") in cmdline.read_bytes().decode(errors="replace"):
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def trial_threads(slots: int, cores: int | None = None) -> int:
    """CPU threads per trial when `slots` trials run at once: the cores shared out (trials that each start a thread
    per core contend for them, and spinning OpenMP threads make that far slower than running one at a time)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // slots)


def launch(
    stage: str, config, folder: Path, params: dict, gpu: str | None, threads: int | None = None
) -> subprocess.Popen:
    """`threads`: the trial's CPU threads (OMP_NUM_THREADS) unless the sweep's own environment sets them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "params.json", params)
    write_text_atomic(folder / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    env = subprocess_env()
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None and not any(v in os.environ for v in THREAD_VARIABLES):
        env.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    with open(folder / "log.txt", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "align.cli", *stage_command(stage, config), str(folder / "config.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    write_text_atomic(folder / "pid", str(proc.pid))
    return proc


def bootstrap_ci(values: list[float], seed: int = 0, n: int = 2000) -> list[float] | None:
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    x = np.asarray(values, dtype=float)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def per_answer_scores(run_dir: Path, metric: str, step: int) -> list[float]:
    """The per-answer scores behind `metric` at `step` (PPO's eval samples), or [] where none were written."""
    if metric == "eval/reward_mean":
        pick = lambda row: row.get("reward")
    elif metric.startswith("eval/judge/") and metric.count("/") == 2:
        name = metric.split("/")[-1]
        pick = lambda row: (row.get("judges") or {}).get(name)
    else:
        return []
    values = []
    for path in sorted(run_dir.glob("eval_samples*.jsonl")):
        for row in read_appended_rows(path):
            if row.get("step") == step and (v := pick(row)) is not None:
                values.append(float(v))
    return values


def method_label(stage: str, config) -> str:
    if stage == "ppo":
        return "ppo" if config.ppo.advantage == "gae" else config.ppo.advantage
    if stage == "dpo":
        return config.loss if hasattr(config, "loss") else "dpo"
    return stage


def trial_result(
    folder: Path, number: int, params: dict, metric: str, gold: str | None, method: str, seconds: float
) -> dict:
    rows = read_metrics(folder / "run")
    with_metric = [r for r in rows if metric in r]
    if not with_metric:
        raise RuntimeError(f"{metric} was never logged in {folder / 'run' / 'metrics.jsonl'} (is evaluation on?)")
    last = with_metric[-1]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    last_eval = evals[-1] if evals else {}
    scores = per_answer_scores(folder / "run", metric, last["step"])
    return {
        "trial": number,
        "run": folder.name,
        "method": method,
        **params,
        "value": last[metric],
        "ci95": bootstrap_ci(scores),
        "n": len(scores) or None,
        "step": last["step"],
        "reward": last_eval.get("eval/reward_mean"),
        "gold": last_eval.get(f"eval/judge/{gold}") if gold else None,
        "kl": last_eval.get("eval/kl"),
        "seconds": seconds,
    }


def run_sweep(path: str | Path, overrides: list[str] = (), log=print) -> Path:
    from optuna.trial import TrialState

    from align.core.config import load_config

    cfg = load_config(SweepConfig, path, overrides)
    stage = cfg.stage_name()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.demo is not None and not (Path(cfg.demo.out) / "summary.json").exists():
        from align.demo import run_demo

        log(f"[sweep] the demo folder {cfg.demo.out} is not complete: running `align demo` there first")
        run_demo(Path(cfg.demo.out), quick=cfg.demo.quick)
    base = base_data(cfg)
    metric, direction = default_metric(cfg, base)
    from align.eval.judges import EvalSection

    gold = EvalSection.model_validate(base.get("eval") or {}).gold_name() if stage == "ppo" else None
    n_trials = cfg.n_trials or cfg.grid_size() or 8
    trial_config(cfg, base, {}, out / "check")  # a bad base or fixed key fails before anything runs
    spec = {"stage": stage, "metric": metric, "direction": direction, "parameters": list(cfg.parameters),
            "n_trials": n_trials, "config": cfg.model_dump(mode="json")}  # fmt: skip
    if (out / "sweep.json").exists():
        before = json.loads((out / "sweep.json").read_text())
        keep = ("stage", "metric", "parameters")
        if (
            any(before.get(k) != spec[k] for k in keep)
            or before["config"]["parameters"] != spec["config"]["parameters"]
        ):
            raise ConfigError(
                f"sweep: {out} holds a sweep with other parameters, stage or metric; give another out_dir"
            )
    write_json_atomic(out / "sweep.json", spec)
    study = open_study(cfg, out, direction)
    dists = distributions(cfg)

    queue = interrupted_trials(study, dists, out)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not abandoned(t)]
    log(
        f"[sweep] {stage}: {n_trials} trials ({cfg.method}), {len(done)} already finished, {len(queue)} to resume; "
        f"ranked by {metric} ({direction})"
    )
    slots = gpu_slots(cfg)
    free = list(slots)
    active: dict[int, tuple[subprocess.Popen, float, str | None, dict, object]] = {}
    failed = 0
    while True:
        while free and (queue or sum(not abandoned(t) for t in study.get_trials(deepcopy=False)) < n_trials):
            if queue:
                number, params = queue.pop(0)
                verb = "resumed"
            else:
                trial = study.ask(dists)
                number, params = trial.number, dict(trial.params)
                verb = "started"
            folder = out / trial_name(number)
            config = trial_config(cfg, base, params, folder)
            gpu = free.pop(0)
            threads = trial_threads(len(slots)) if len(slots) > 1 else None  # one at a time: torch's own default
            proc = launch(stage, config, folder, params, gpu, threads)
            active[number] = (proc, time.perf_counter(), gpu, params, config)
            log(f"[sweep] {verb} {folder.name} {params}" + (f" on GPU {gpu}" if gpu is not None else ""))
        if not active:
            break
        time.sleep(0.5)
        for number, (proc, t0, gpu, params, config) in list(active.items()):
            if proc.poll() is None:
                continue
            del active[number]
            free.append(gpu)
            folder = out / trial_name(number)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                failed += 1
                study.tell(number, state=TrialState.FAIL)
                log(f"[sweep] {folder.name} failed (exit {proc.returncode}); see {folder / 'log.txt'}")
                continue
            try:
                result = trial_result(folder, number, params, metric, gold, method_label(stage, config), seconds)
            except RuntimeError as e:
                failed += 1
                study.tell(number, state=TrialState.FAIL)
                log(f"[sweep] {folder.name}: {e}")
                continue
            write_json_atomic(folder / "result.json", result)
            study.tell(number, result["value"])
            log(f"[sweep] finished {folder.name} in {seconds:.0f} s: {metric} = {result['value']:.4g}")
    results = collect(out, metric, direction, list(cfg.parameters))
    from align.report import write_report

    report = write_report(out)
    if results:
        best = results[0]
        log(f"[sweep] best: {best['run']} {metric} = {best['value']:.4g}; table {out / 'results.md'}, report {report}")
    if failed:
        log(f"[sweep] {failed} trials failed this time (see their log.txt); they are not run again")
    return out


def collect(out: Path, metric: str, direction: str, params: list[str]) -> list[dict]:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("trial-*/result.json"))]
    sign = -1 if direction == "maximize" else 1
    results.sort(key=lambda r: sign * r["value"])
    for i, r in enumerate(results, start=1):
        r["rank"] = i
    write_jsonl_atomic(out / "results.jsonl", results)
    cols = ["rank", "run", "method", *params, "value", "ci95", "reward", "gold", "kl", "seconds"]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(results)
    write_text_atomic(out / "results.csv", table.getvalue())
    fmt = lambda v: (
        f"{v:.4g}" if isinstance(v, float) else "–".join(f"{x:.4g}" for x in v) if isinstance(v, list) else str(v)
    )
    header = [c if c != "value" else metric for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in results]
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    return results
