"""`align sweep` pieces that need no training run: stage and metric defaults, search spaces (lists, ranges, log
scale), one trial per GPU and its share of the cores, trial configs validated before anything runs, and a sweep folder kept to one sweep.
The whole loop (parallel trials, kill, resume, ranking) runs in `test_ppo_train.py`; the demo sweep in
`test_demo.py`."""

import pytest
import yaml

from align.core.config import ConfigError
from align.sweep import (
    SweepConfig,
    default_metric,
    distributions,
    gpu_slots,
    launch,
    open_study,
    read_yaml,
    run_sweep,
    trial_config,
    trial_threads,
)
from conftest import ROOT


def sweep(**kw) -> SweepConfig:
    return SweepConfig.model_validate({"base": str(ROOT / "configs" / "ppo" / "tiny.yaml"), **kw})


def test_stage_and_metric_follow_the_base_config(tmp_path):
    cfg = sweep(parameters={"ppo.kl_coef": [0.1]})
    base = read_yaml(cfg.base)
    assert cfg.stage_name() == "ppo" and default_metric(cfg, base) == ("eval/reward_mean", "maximize")
    missing = SweepConfig.model_validate({"base": "/nowhere/ppo.yaml", "parameters": {"lr": [1]}})
    with pytest.raises(ConfigError, match="base /nowhere/ppo.yaml: config file not found"):
        missing.stage_name()
    base["eval"] = {"judges": [{"kind": "function", "target": "x.py:f", "name": "gold"}]}
    assert default_metric(cfg, base) == ("eval/judge/gold", "maximize")
    dpo = SweepConfig.model_validate({"base": str(ROOT / "configs/dpo/tiny.yaml"), "parameters": {"lr": [1e-3]}})
    assert dpo.stage_name() == "dpo" and default_metric(dpo, {}) == ("eval/loss", "minimize")
    (tmp_path / "mine.yaml").write_text("ppo: {}\n")
    own = SweepConfig.model_validate({"base": str(tmp_path / "mine.yaml"), "parameters": {"lr": [1e-3]}})
    with pytest.raises(ConfigError, match="set `stage`"):
        own.stage_name()


def test_search_spaces_and_samplers(tmp_path):
    cfg = sweep(method="tpe", n_trials=6, parameters={
        "ppo.advantage": ["gae", "grpo"],
        "policy_optim.lr": {"low": 1e-5, "high": 1e-3, "log": True},
        "ppo.n_samples": {"low": 2, "high": 6, "int": True, "step": 2},
    })  # fmt: skip
    dists = distributions(cfg)
    study = open_study(cfg, tmp_path, "maximize")
    for _ in range(6):
        trial = study.ask(dists)
        p = trial.params
        assert p["ppo.advantage"] in ("gae", "grpo") and 1e-5 <= p["policy_optim.lr"] <= 1e-3
        assert p["ppo.n_samples"] in (2, 4, 6)
        study.tell(trial, p["policy_optim.lr"])
    assert dists["policy_optim.lr"].log and cfg.grid_size() is None
    with pytest.raises(ConfigError, match="grid takes lists"):
        open_study(cfg.model_copy(update={"method": "grid"}), tmp_path / "g", "maximize")
    grid = sweep(parameters={"ppo.kl_coef": [0.1, 0.2], "lr": [1e-4, 1e-3, 1e-2]})
    (tmp_path / "grid").mkdir()
    study = open_study(grid, tmp_path / "grid", "maximize")
    seen = set()
    for _ in range(6):  # the grid, each point once, asked and told outside study.optimize
        trial = study.ask(distributions(grid))
        seen.add((trial.params["ppo.kl_coef"], trial.params["lr"]))
        study.tell(trial, 0.0)
    assert len(seen) == 6 == grid.grid_size()


def test_one_trial_per_gpu():
    assert gpu_slots(sweep(parameters={"lr": [1]}, parallel=3)) == [None, None, None]
    assert gpu_slots(sweep(parameters={"lr": [1]}, gpus=[0, 3])) == ["0", "3"]  # CUDA_VISIBLE_DEVICES per slot


def test_trials_at_once_share_the_cores_out(tmp_path, monkeypatch):
    """Trials that each start a thread per core fight over the cores (on 2 cores two PPO trials at once took 39 s
    each instead of 5): each gets its share through OMP_NUM_THREADS, unless the sweep's environment sets it."""
    assert [trial_threads(n, cores=16) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    seen = []

    class Popen:
        def __init__(self, cmd, env, **kw):
            seen.append(env)
            self.pid = 1

    monkeypatch.setattr("align.sweep.subprocess.Popen", Popen)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cfg = sweep(parameters={"lr": [1e-4]})
    config = trial_config(cfg, read_yaml(cfg.base), {"lr": 1e-4}, tmp_path / "trial-000")
    launch("ppo", config, tmp_path / "trial-000", {"lr": 1e-4}, None, threads=3)
    assert seen[-1]["OMP_NUM_THREADS"] == seen[-1]["MKL_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's choice stands
    launch("ppo", config, tmp_path / "trial-000", {"lr": 1e-4}, "0", threads=3)
    assert seen[-1]["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in seen[-1]
    assert seen[-1]["CUDA_VISIBLE_DEVICES"] == "0"


def test_trial_configs_are_validated_before_anything_runs(tmp_path):
    cfg = sweep(parameters={"lr": [1e-4]}, fixed={"ppo.iterations": 3})
    config = trial_config(cfg, read_yaml(cfg.base), {"lr": 1e-4}, tmp_path / "trial-000")
    assert config.policy_optim.lr == 1e-4 and config.ppo.iterations == 3 and config.resume is True
    assert config.out_dir == str(tmp_path / "trial-000" / "run")
    with pytest.raises(ConfigError, match="trial-001"):
        trial_config(cfg, read_yaml(cfg.base), {"ppo.no_such_key": 1}, tmp_path / "trial-001")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"base": cfg.base, "parameters": {"ppo.kl_coef": ["high"]}, "out_dir": str(tmp_path)})
    )
    with pytest.raises(ConfigError, match="kl_coef"):
        run_sweep(bad, log=lambda *_: None)


def test_a_sweep_folder_holds_one_sweep(tmp_path):
    first = tmp_path / "first.yaml"
    out = tmp_path / "out"
    spec = {"base": str(ROOT / "configs/ppo/tiny.yaml"), "parameters": {"ppo.kl_coef": [0.1]}, "n_trials": 1,
            "out_dir": str(out), "fixed": {"models.policy": str(tmp_path / "missing")}}  # fmt: skip
    first.write_text(yaml.safe_dump(spec))
    logs = []
    run_sweep(first, log=logs.append)  # the trial fails (no policy there) and is recorded as failed
    assert any("trial-000 failed (exit 2)" in l for l in logs) and "missing" in (out / "trial-000/log.txt").read_text()
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL]
    logs.clear()
    run_sweep(first, log=logs.append)  # not run again
    assert "1 already finished, 0 to resume" in logs[0] and not any("started" in l for l in logs)
    spec["parameters"] = {"ppo.ptx_coef": [0.1]}
    first.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="holds a sweep with other parameters"):
        run_sweep(first, log=lambda *_: None)


@pytest.mark.parametrize("method", ["grid", "tpe"])
def test_a_trial_killed_inside_ask_gets_its_parameters_on_resume(tmp_path, method):
    """A kill between Optuna creating a trial and drawing its parameters leaves a RUNNING trial with some or none;
    the restarted sweep draws the rest, so it resumes with a whole configuration."""
    from optuna.trial import Trial

    from align.sweep import interrupted_trials

    cfg = sweep(method=method, n_trials=4, parameters={"ppo.advantage": ["gae", "grpo"], "ppo.kl_coef": [0.05, 0.5]})
    dists = distributions(cfg)
    study = open_study(cfg, tmp_path, "maximize")
    first = study.ask(dists)  # a whole trial, running
    cut = Trial(study, study._storage.create_new_trial(study._study_id))  # created, then the process died
    if method == "grid":
        study.sampler.before_trial(study, study._storage.get_trial(cut._trial_id))  # grid point assigned
        cut.suggest_categorical("ppo.advantage", ["gae", "grpo"])  # one of two drawn
    queue = interrupted_trials(study, dists, tmp_path)
    assert [n for n, _ in queue] == [first.number, cut.number]
    assert all(set(params) == set(dists) for _, params in queue)
    if method == "grid":  # two distinct grid points
        assert len({tuple(sorted(p.items())) for _, p in queue}) == 2
