"""The demo's evaluation: held-out prompts answered by the base, SFT and PPO policies and judged by the demo world's
gold scorer, with bootstrap intervals; and the gold score of PPO's held-out samples at every evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import bootstrap

from align.core.records import read_appended_rows, write_jsonl_atomic
from align.world import demo as world

if TYPE_CHECKING:  # the config type lives with the pipeline, which imports this module
    from align.demo import DemoConfig


def sample_policy(
    model_dir: Path, prompts: list[dict], n: int, max_new_tokens: int, seed: int, batch_size: int = 64
) -> list[list[str]]:
    """n sampled responses (temperature 1, top-p 0.9, fixed per-row seeds) for each prompt."""
    from align.core.chatml import render
    from base_model import QwenTokenizer, load_pretrained
    from base_model.generate import SamplingParams, generate

    model = load_pretrained(model_dir)
    tokenizer = QwenTokenizer.from_file(model_dir)
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    texts: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = [render(p["prompt"], tokenizer, add_generation_prompt=True) for _, p in chunk]
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            top_p=0.9,
            stop_token_ids=(tokenizer.im_end_id, tokenizer.eod_id),
            vocab_limit=len(tokenizer),
            row_seeds=[seed + start + j for j in range(len(chunk))],
        )
        for (i, _), toks in zip(chunk, generate(model, ids, params, pad_id=tokenizer.pad_id).token_ids):
            texts[i].append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return texts


def interval(values: list[float], seed: int) -> list[float]:
    """95% bootstrap (BCa) interval of the mean."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2 or np.all(x == x[0]):
        return [float(x.mean()), float(x.mean())]
    res = bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=2000, random_state=seed, method="BCa")
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def gold_of(prompts: list[dict], responses: list[list[str]]) -> list[float]:
    """Per prompt, the mean gold score of its responses."""
    return [float(np.mean([world.gold_score(p["prompt"], r) for r in rs])) for p, rs in zip(prompts, responses)]


def evaluate(cfg: DemoConfig, models: dict[str, Path], ppo_run: Path, world_dir: Path, folder: Path) -> dict:
    """Gold scores of each policy on held-out prompts (95% intervals), each trained method's difference from SFT
    paired by prompt, gold by kind of request, and gold against the reward model over PPO's evaluations."""
    prompts = [json.loads(l) for l in (world_dir / "heldout_prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    gold, samples = {}, []
    for name, path in models.items():
        responses = sample_policy(path, prompts, cfg.gold_samples, cfg.max_new_tokens, cfg.seed * 7919)
        scores = gold_of(prompts, responses)
        kinds = {
            k: float(np.mean([s for s, p in zip(scores, prompts) if p["kind"] == k]))
            for k in sorted({p["kind"] for p in prompts})
        }
        gold[name] = {
            "mean": float(np.mean(scores)),
            "ci95": interval(scores, cfg.seed),
            "by_kind": kinds,
            "scores": scores,
        }
        samples += [
            {
                "policy": name,
                "prompt": p["prompt"][-1]["content"],
                "kind": p["kind"],
                "response": rs[0],
                "gold": world.gold_score(p["prompt"], rs[0]),
            }
            for p, rs in list(zip(prompts, responses))[:12]
        ]
    summary = {
        "gold": {name: {k: v for k, v in g.items() if k != "scores"} for name, g in gold.items()},
        "heldout_prompts": len(prompts),
        "samples_per_prompt": cfg.gold_samples,
    }
    for name in [n for n in gold if n not in ("base", "sft")]:
        diff = [a - b for a, b in zip(gold[name]["scores"], gold["sft"]["scores"])]
        summary["gold"][f"{name}_minus_sft"] = {"mean": float(np.mean(diff)), "ci95": interval(diff, cfg.seed)}
    write_jsonl_atomic(
        folder / "gold_scores.jsonl",
        [
            {"prompt": p["prompt"][-1]["content"], "kind": p["kind"], **{n: gold[n]["scores"][i] for n in gold}}
            for i, p in enumerate(prompts)
        ],
    )
    write_jsonl_atomic(folder / "samples.jsonl", samples)
    write_jsonl_atomic(folder / "gold_vs_reward.jsonl", gold_over_steps(ppo_run))
    return summary


def gold_over_steps(ppo_run: Path) -> list[dict]:
    """For each PPO evaluation: mean reward-model score, mean gold score and mean KL of the held-out responses."""
    by_step: dict[int, dict] = {}
    for path in sorted(ppo_run.glob("eval_samples*.jsonl")):
        for row in read_appended_rows(path):
            by_step.setdefault(row["step"], {})[(json.dumps(row["prompt"]), len(by_step.get(row["step"], {})))] = row
    out = []
    for step in sorted(by_step):
        rows = list(by_step[step].values())
        golds = [g for r in rows if (g := world.gold_score(r["prompt"], r["response"])) is not None]
        out.append(
            {
                "step": step,
                "reward": float(np.mean([r["reward"] for r in rows])),
                "gold": float(np.mean(golds)) if golds else None,
                "kl": float(np.mean([r["kl"] for r in rows])),
                "n": len(rows),
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------- the run


TOOL_STEP_TOKENS = 48  # per agent step: a call or a final answer is about 30 tokens


def tool_use(cfg: DemoConfig, models: dict[str, Path], world_dir: Path, folder: Path) -> dict:
    """The held-out tool-use split answered by each policy through the agent loop (`align agent` with the
    calculator, greedy, at most 3 steps): accuracy of the final answers with Wilson intervals, whether the first
    call was the calculator where one was needed, calls made where none was, and each policy's difference from the
    base policy paired by question (bootstrap interval). Transcripts: `tools/<policy>.jsonl`."""
    from align.serve import LocalModel
    from align.tools.agent import Agent, LocalBackend, run_questions, score_runs
    from align.tools.builtin import builtin_tools

    questions = [json.loads(l) for l in (world_dir / "tool_questions.jsonl").read_text(encoding="utf-8").splitlines()]
    out: dict = {"questions": len(questions), "max_steps": 3, "policies": {}}
    correct = {}
    for name, path in models.items():
        backend = LocalBackend(LocalModel.load(str(path)), 0.0, TOOL_STEP_TOKENS)
        agent = Agent(backend, builtin_tools(["calculator"], folder), max_steps=3)
        try:
            runs = run_questions(agent, questions, folder / f"{name}.jsonl", log=lambda _: None)
        finally:
            agent.close()
        scores = score_runs(questions, runs)
        correct[name] = [float(c) for c in scores.pop("correct")]
        out["policies"][name] = scores
    for name in [n for n in correct if n != "base"]:
        diff = [a - b for a, b in zip(correct[name], correct["base"])]
        out[f"{name}_minus_base"] = {"mean": float(np.mean(diff)), "ci95": interval(diff, cfg.seed)}
    return out
