"""`align report DIR`: the HTML report of a demo run, a sweep or any training run, built from its files alone.

Every number in the page is written by `num()`, which tags it with the file and key it came from
(`data-src`, `data-key`), so a test can check each one against its source.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from align.core.metrics import read_metrics  # noqa: E402
from align.core.records import DataError, read_appended_rows  # noqa: E402
from base_model.atomic import write_text_atomic  # noqa: E402

CSS = """body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.fig { display: inline-block; margin: 0 1em 1em 0; } .note { color: #555; font-size: 0.9em; }
pre { white-space: pre-wrap; margin: 0; }"""


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, str)):
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def num(src: str, key: str, value) -> str:
    return f'<span class="v" data-src="{html.escape(src)}" data-key="{html.escape(key)}">{fmt(value)}</span>'


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": [1, 2]}} -> {"a.b.0": 1, "a.b.1": 2} (numbers and strings only)."""
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def figure(fig, save_as: Path | None = None, alt: str = "") -> str:
    """The figure as an inline <img> (with `alt` text); also written to `save_as` (a PNG) when given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    if save_as is not None:
        save_as.parent.mkdir(parents=True, exist_ok=True)
        save_as.write_bytes(buf.getvalue())
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _jsonl(path: Path) -> list[dict]:
    return read_appended_rows(path) if path.exists() else []


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(folder: str | Path) -> Path:
    folder = Path(folder)
    if (folder / "sweep.json").exists():
        body = sweep_body(folder)
        title = f"Sweep {folder.name}"
    elif (folder / "summary.json").exists():
        body = demo_body(folder)
        title = f"Demo run {folder.name}"
    elif (folder / "metrics.jsonl").exists():
        body = run_body(folder)
        title = f"Run {folder.name}"
    else:
        raise DataError(
            f"{folder}: not a demo folder (summary.json), a sweep folder (sweep.json) or a run folder (metrics.jsonl)"
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    out = folder / "report.html"
    write_text_atomic(out, page)
    return out


# ------------------------------------------------------------------------------------------------------ demo


METHODS = ("ppo", "grpo", "dpo")  # what the demo trains from the SFT policy


def methods_table(s: dict) -> str:
    """Each method's gold score, its difference from SFT paired by prompt, KL to SFT and wall time."""
    src, g = "summary.json", s["gold"]
    rows = []
    for name in [n for n in METHODS if f"{n}_minus_sft" in g]:
        d = g[f"{name}_minus_sft"]
        kl = s.get(name, {}).get("eval_kl_last")
        kl_cell = num(src, f"{name}.eval_kl_last", kl) if kl is not None else "—"
        rows.append(
            f"<tr><td>{name}</td><td class='num'>{num(src, f'gold.{name}.mean', g[name]['mean'])}</td>"
            f"<td class='num'>{num(src, f'gold.{name}_minus_sft.mean', d['mean'])}</td>"
            f"<td class='num'>{num(src, f'gold.{name}_minus_sft.ci95.0', d['ci95'][0])} – "
            f"{num(src, f'gold.{name}_minus_sft.ci95.1', d['ci95'][1])}</td>"
            f"<td class='num'>{kl_cell}</td>"
            f"<td class='num'>{num(src, f'seconds.{name}', s['seconds'][name])}</td></tr>"
        )
    return (
        "<h2>Did the methods help?</h2><p>Each method starts from the SFT policy: PPO with a value model, GRPO "
        "without one (group-normalised advantages over 4 responses per prompt), DPO on the annotators' "
        "comparisons (no reward model). Differences from SFT are paired by prompt; KL is nats per response to the "
        "SFT policy at the last evaluation (DPO samples nothing while it trains, so none is measured); wall time "
        "is the stage's, in seconds.</p><table><tr><th>method</th><th>gold mean</th><th>minus SFT</th>"
        "<th>95% CI</th><th>KL to SFT</th><th>seconds</th></tr>" + "".join(rows) + "</table>"
    )


def tool_use_table(s: dict) -> str:
    """The held-out tool-use split answered through the agent loop, per policy."""
    src, t = "summary.json", s["tools"]

    def cell(key: str, value) -> str:
        return f"<td class='num'>{num(src, key, value)}</td>" if value is not None else "<td>—</td>"

    rows = []
    for name, p in t["policies"].items():
        k = f"tools.policies.{name}"
        diff = t.get(f"{name}_minus_base")
        rows.append(
            f"<tr><td>{html.escape(name)}</td>{cell(f'{k}.accuracy', p['accuracy'])}"
            f"<td class='num'>{num(src, f'{k}.accuracy_ci95.0', p['accuracy_ci95'][0])} – "
            f"{num(src, f'{k}.accuracy_ci95.1', p['accuracy_ci95'][1])}</td>"
            + (
                f"<td class='num'>{num(src, f'tools.{name}_minus_base.mean', diff['mean'])} "
                f"[{num(src, f'tools.{name}_minus_base.ci95.0', diff['ci95'][0])}, "
                f"{num(src, f'tools.{name}_minus_base.ci95.1', diff['ci95'][1])}]</td>"
                if diff
                else "<td>—</td>"
            )
            + cell(f"{k}.accuracy_need_tool", p.get("accuracy_need_tool"))
            + cell(f"{k}.accuracy_no_tool", p.get("accuracy_no_tool"))
            + cell(f"{k}.tool_selection", p["tool_selection"])
            + cell(f"{k}.false_positive_rate", p["false_positive_rate"])
            + cell(f"{k}.tool_calls", p["tool_calls"])
            + cell(f"{k}.failed_calls", p["failed_calls"])
            + "</tr>"
        )
    return (
        "<h2>Tool use</h2><p>The held-out tool-use split "
        f"({num(src, 'tools.questions', t['questions'])} questions: two-digit sums and differences and "
        "products of a digit and a two-digit number, held out from the SFT examples, and some requests that need "
        "no tool) answered through the agent loop "
        "(<code>align agent --tools calculator</code>, greedy, at most "
        f"{num(src, 'tools.max_steps', t['max_steps'])} steps). Accuracy: the final answer holds the right "
        "result (95% Wilson interval); the difference from the base policy is paired by question (bootstrap "
        "interval); calculations and no tool needed: the accuracy on each part; tool selection: the first call was "
        "the calculator where one was needed; false positives: a call where none was needed. Transcripts are in <code>tools/</code>.</p><table><tr><th>policy</th>"
        "<th>accuracy</th><th>95% CI</th><th>minus base [95% CI]</th><th>calculations</th><th>no tool needed</th>"
        "<th>tool selection</th>"
        "<th>false positives</th><th>calls</th><th>failed calls</th></tr>" + "".join(rows) + "</table>"
    )


def demo_body(folder: Path) -> str:
    s = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    src = "summary.json"
    g = s["gold"]
    names = [n for n in ("base", "sft", *METHODS) if n in g]
    parts = [
        f"<p class='note'>Mode: {html.escape(s.get('mode', '?'))}. Tokenizer: "
        f"{html.escape(s['tokenizer']['kind'])}, {num(src, 'tokenizer.vocab_size', s['tokenizer']['vocab_size'])} "
        f"ranks. Gold scores are the demo world's programmatic judge (right answer, or a refusal of a harmful "
        f"request), on {num(src, 'heldout_prompts', s['heldout_prompts'])} held-out prompts, "
        f"{num(src, 'samples_per_prompt', s['samples_per_prompt'])} sampled responses each; intervals are 95% "
        f"bootstrap intervals.</p>"
    ]
    parts.append(methods_table(s))
    kinds = sorted(g[names[0]]["by_kind"])
    rows = "".join(
        f"<tr><td>{n}</td><td class='num'>{num(src, f'gold.{n}.mean', g[n]['mean'])}</td>"
        f"<td class='num'>{num(src, f'gold.{n}.ci95.0', g[n]['ci95'][0])} – "
        f"{num(src, f'gold.{n}.ci95.1', g[n]['ci95'][1])}</td>"
        + "".join(f"<td class='num'>{num(src, f'gold.{n}.by_kind.{k}', g[n]['by_kind'][k])}</td>" for k in kinds)
        + "</tr>"
        for n in names
    )
    parts.append(
        "<table><tr><th>policy</th><th>gold mean</th><th>95% CI</th>"
        + "".join(f"<th>{html.escape(k)}</th>" for k in kinds)
        + f"</tr>{rows}</table>"
    )
    if "tools" in s:
        parts.append(tool_use_table(s))
    fig, ax = plt.subplots(figsize=(4.2, 3))
    ax.bar(
        names,
        [g[n]["mean"] for n in names],
        yerr=[[g[n]["mean"] - g[n]["ci95"][0] for n in names], [g[n]["ci95"][1] - g[n]["mean"] for n in names]],
        capsize=4,
        color=["#bbb", "#7aa6d8", "#2b6cb0"][: len(names)],
    )
    ax.set_ylabel("gold score (held out)")
    ax.set_ylim(0, 1)
    plots = [figure(fig, folder / "figures" / "gold_by_policy.png")]

    curve = _jsonl(folder / "eval" / "gold_vs_reward.jsonl")
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3))
        steps = [r["step"] for r in curve]
        ax.plot(steps, [r["reward"] for r in curve], "o-", color="#c05621", label="reward model (raw)")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("reward-model score", color="#c05621")
        ax2 = ax.twinx()
        ax2.plot(steps, [r["gold"] for r in curve], "s-", color="#2b6cb0", label="gold")
        ax2.set_ylabel("gold score", color="#2b6cb0")
        ax.set_title("Proxy vs gold over PPO (where they part, the reward is hacked)", fontsize=9)
        plots.append(figure(fig, folder / "figures" / "proxy_vs_gold.png"))
        fig, ax = plt.subplots(figsize=(4.2, 3))
        ax.plot([r["kl"] for r in curve], [r["reward"] for r in curve], "o-", color="#c05621", label="reward model")
        ax.set_xlabel("KL to the SFT policy (nats / response)")
        ax.set_ylabel("reward-model score")
        for r in curve:
            ax.annotate(str(r["step"]), (r["kl"], r["reward"]), fontsize=7)
        ax.set_title("KL–reward curve", fontsize=9)
        plots.append(figure(fig, folder / "figures" / "kl_reward.png"))
    parts.append("<h2>Plots</h2>" + "".join(plots))
    if curve:
        gsrc = "eval/gold_vs_reward.jsonl"
        parts.append(
            "<h3>Proxy and gold at each PPO evaluation</h3><table><tr><th>step</th><th>reward model</th>"
            "<th>gold</th><th>KL</th><th>responses</th></tr>"
            + "".join(
                f"<tr><td>{num(gsrc, f'{i}.step', r['step'])}</td>"
                f"<td class='num'>{num(gsrc, f'{i}.reward', r['reward'])}</td>"
                f"<td class='num'>{num(gsrc, f'{i}.gold', r['gold'])}</td>"
                f"<td class='num'>{num(gsrc, f'{i}.kl', r['kl'])}</td>"
                f"<td class='num'>{num(gsrc, f'{i}.n', r['n'])}</td></tr>"
                for i, r in enumerate(curve)
            )
            + "</table>"
        )
    parts.append(training_curves(folder))
    samples = _jsonl(folder / "eval" / "samples.jsonl")
    if samples:
        parts.append(
            "<h2>Sample responses (held-out prompts)</h2><table><tr><th>policy</th><th>prompt</th>"
            "<th>response</th><th>gold</th></tr>"
            + "".join(
                f"<tr><td>{html.escape(r['policy'])}</td><td>{html.escape(r['prompt'])}</td>"
                f"<td><pre>{html.escape(r['response'])}</pre></td>"
                f"<td class='num'>{num('eval/samples.jsonl', f'{i}.gold', r['gold'])}</td></tr>"
                for i, r in enumerate(samples)
            )
            + "</table>"
        )
    flat = flatten({k: v for k, v in s.items() if k not in ("gold",)})
    parts.append(
        "<h2>Every figure of the run</h2><table><tr><th>key</th><th>value</th></tr>"
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td class='num'>"
            + (num(src, k, v) if isinstance(v, (int, float)) or v is None else html.escape(str(v)))
            + "</td></tr>"
            for k, v in flat.items()
        )
        + "</table>"
    )
    return "".join(parts)


def training_curves(folder: Path) -> str:
    stages = [
        ("pretrain", "train/loss", "pretraining loss"),
        ("sft", "train/loss", "SFT loss"),
        ("rm_pmp", "train/loss", "PMP loss"),
        ("rm", "train/loss", "RM loss"),
        ("ppo", "train/reward/raw", "PPO reward (raw)"),
        ("ppo", "train/kl", "PPO KL"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5))
    any_plotted = False
    for ax, (stage, key, title) in zip(axes.flat, stages):
        path = folder / stage / "run" / "metrics.jsonl"
        if path.exists():
            xs, ys = _series(read_metrics(path), key)
            ax.plot(xs, ys, color="#2b6cb0")
            any_plotted = any_plotted or bool(xs)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return "<h2>Training curves</h2>" + figure(fig) if any_plotted else ""


# ------------------------------------------------------------------------------------------------- any run


def run_gold(folder: Path, rows: list[dict]) -> tuple[str | None, int]:
    """The run's gold judge (`eval.gold` of its config, else its first judge, else None) and its
    `eval.hacking_window`."""
    import yaml

    from align.eval.judges import EvalSection

    cfg_path = folder / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    section = EvalSection.model_validate((cfg or {}).get("eval") or {})
    if section.gold_name():
        return section.gold_name(), section.hacking_window
    keys = sorted({k for r in rows for k in r if k.startswith("eval/judge/") and k.count("/") == 2})
    return (keys[0].split("/")[-1] if keys else None), section.hacking_window


def run_body(folder: Path) -> str:
    """Any training run: its last evaluation, proxy against gold over the evaluations (with the reward-hacking
    check), KL–reward and KL–gold curves, and its training curves."""
    from align.eval.judges import hacking_warning

    rows = read_metrics(folder)
    src = "metrics.jsonl"
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    parts = [f"<p>{len(rows)} metric rows, {len(evals)} evaluations.</p>"]
    if evals:
        last = evals[-1]
        keys = sorted(k for k in last if k.startswith("eval/"))
        parts.append(
            f"<h2>Last evaluation (step {num(src, 'step', last['step'])})</h2><table><tr><th>metric</th>"
            "<th>value</th></tr>"
            + "".join(f"<tr><td>{html.escape(k)}</td><td class='num'>{num(src, k, last[k])}</td></tr>" for k in keys)
            + "</table>"
        )
    gold, window = run_gold(folder, rows)
    gkey = f"eval/judge/{gold}" if gold else None
    curve = [r for r in evals if gkey in r] if gkey else []
    has_proxy = bool(curve) and all("eval/reward_mean" in r for r in curve)
    if curve:
        steps, golds = [r["step"] for r in curve], [r[gkey] for r in curve]
        proxy = [r["eval/reward_mean"] for r in curve] if has_proxy else []
        plots = []
        if has_proxy:
            flagged = [r["step"] for r in curve if r.get("eval/hacking_warning")]
            warning = hacking_warning(steps, proxy, golds, window)
            if flagged or warning:
                parts.append(
                    "<p class='warn' style='background:#fff3cd;padding:6px;border:1px solid #e0c060'><b>Reward "
                    f"hacking?</b> {html.escape(warning or '')} Flagged during training at steps "
                    f"{', '.join(map(str, flagged)) or 'none'}.</p>"
                )
            else:
                parts.append(f"<p>No reward hacking flagged: the proxy and the gold judge <b>{html.escape(gold)}</b> "
                             "did not part over any evaluations in a row.</p>")  # fmt: skip
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.set_xlabel("step")
        if has_proxy:
            ax.plot(steps, proxy, "o-", color="#c05621")
            ax.set_ylabel("reward (proxy)", color="#c05621")
            ax = ax.twinx()
        ax.plot(steps, golds, "s-", color="#2b6cb0")
        ax.set_ylabel(f"judge {gold} (gold)", color="#2b6cb0")
        title = "Proxy vs gold (where they part, the reward is hacked)" if has_proxy else "Gold judge over training"
        ax.set_title(title, fontsize=9)
        plots.append(figure(fig, folder / "figures" / "proxy_vs_gold.png", alt=title))
        if all("eval/kl" in r for r in curve):
            panels = ([(proxy, "reward (proxy)", "#c05621", "KL–reward")] if has_proxy else []) + [
                (golds, f"judge {gold} (gold)", "#2b6cb0", "KL–gold")
            ]
            fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
            kls = [r["eval/kl"] for r in curve]
            for ax, (ys, label, colour, title) in zip(axes[0], panels):
                ax.plot(kls, ys, "o-", color=colour)
                for x, y, st in zip(kls, ys, steps):
                    ax.annotate(str(st), (x, y), fontsize=7)
                ax.set_xlabel("KL to the initial policy (nats / response)")
                ax.set_ylabel(label)
                ax.set_title(title, fontsize=9)
            fig.tight_layout()
            plots.append(figure(fig, folder / "figures" / "kl_frontiers.png", alt=" and ".join(p[3] for p in panels)))
        parts.append("<h2>Proxy and gold</h2>" + "".join(plots))
    elif evals:
        parts.append(
            "<p class='note'>No judge in this run's evaluations: add <code>eval.judges</code> to its config to see "
            "its gold curve beside the proxy.</p>"
        )
    train_keys = [k for k in ("train/loss", "train/reward/raw", "train/kl", "train/accuracy", "train/policy_loss",
                              "train/value_loss") if any(k in r for r in rows)]  # fmt: skip
    if train_keys:
        fig, axes = plt.subplots(1, len(train_keys), figsize=(3.3 * len(train_keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], train_keys):
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, color="#2b6cb0")
            ax.set_title(key, fontsize=9)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        parts.append("<h2>Training curves</h2>" + figure(fig))
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------- sweeps


def sweep_body(folder: Path) -> str:
    spec = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    results = _jsonl(folder / "results.jsonl")
    src = "results.jsonl"
    params, metric = spec["parameters"], spec["metric"]
    better = "higher" if spec["direction"] == "maximize" else "lower"
    parts = [
        f"<p>{spec['stage']} sweep: {len(results)} finished trials of {spec['n_trials']}; ranked by "
        f"<b>{html.escape(metric)}</b> ({better} is better) at each trial's last evaluation, with a bootstrap 95% "
        "interval over the evaluation's answers where the run wrote them.</p>"
    ]
    cols = ["rank", "run", "method", *params, "value", "ci95", "reward", "gold", "kl", "seconds"]
    heads = [metric if c == "value" else "95% CI" if c == "ci95" else c for c in cols]

    def cell(i: int, r: dict, c: str) -> str:
        if c in ("run", "method"):
            return f"<td>{html.escape(str(r.get(c)))}</td>"
        if c == "ci95":
            ci = r.get("ci95")
            return (
                "<td class='num'>"
                + (f"{num(src, f'{i}.ci95.0', ci[0])} – {num(src, f'{i}.ci95.1', ci[1])}" if ci else "n/a")
                + "</td>"
            )
        return f"<td class='num'>{num(src, f'{i}.{c}', r.get(c))}</td>"

    parts.append(
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in heads)
        + "</tr>"
        + "".join("<tr>" + "".join(cell(i, r, c) for c in cols) + "</tr>" for i, r in enumerate(results))
        + "</table>"
    )
    plots = []
    methods = sorted({r["method"] for r in results})
    colours = dict(zip(methods, ["#c05621", "#2b6cb0", "#2f855a", "#6b46c1", "#b7791f", "#4a5568"] * 3))
    for ykey, ylabel in (("reward", "reward (proxy)"), ("gold", "gold judge")):
        pts = [r for r in results if r.get("kl") is not None and r.get(ykey) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(4.6, 3.4))
        for m in methods:
            mine = [r for r in pts if r["method"] == m]
            ax.scatter([r["kl"] for r in mine], [r[ykey] for r in mine], color=colours[m], label=m)
        front = pareto([(r["kl"], r[ykey]) for r in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="#555", alpha=0.6)
        for r in pts:
            ax.annotate(r["run"].replace("trial-", "#"), (r["kl"], r[ykey]), fontsize=6)
        ax.set_xlabel("KL to the initial policy (nats / response)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.set_title(f"KL–{ykey} frontier across methods", fontsize=9)
        plots.append(figure(fig, alt=f"KL–{ykey} frontier across methods"))
    curves = [(r["run"], read_metrics(folder / r["run"] / "run")) for r in results]
    curves = [(name, _series(rows, metric)) for name, rows in curves if (folder / name / "run").exists()]
    if any(xs for _, (xs, _) in curves):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for name, (xs, ys) in curves:
            ax.plot(xs, ys, "o-", label=name, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=6)
        ax.set_title("Per-trial curves", fontsize=9)
        plots.append(figure(fig, alt=f"{metric} of each trial over its steps"))
    if plots:
        parts.append("<h2>Plots</h2>" + "".join(plots))
    return "".join(parts)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both lower KL and higher reward, by KL."""
    front, best = [], float("-inf")
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front
