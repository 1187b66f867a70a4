"""Reward-model evaluation (`align rm eval`) and scoring (`align rm score`).

Pairwise accuracy overall, per tag and per source with Wilson 95% intervals; the reward-margin distribution; the
calibration of sigmoid(r_chosen - r_rejected) against how often the chosen response really was preferred; a
length-only baseline (does the longer response win?); an HTML report with plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from align.core.records import DataError, as_messages, iter_records, write_jsonl_atomic
from base_model import QwenTokenizer
from rm.data import Pair, collate_sequences, encode_response, load_pairs
from rm.model import RewardModel, load_reward_model


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


@torch.no_grad()
def score_texts(
    model: RewardModel,
    tokenizer: QwenTokenizer,
    items: list[tuple[list[dict], str]],
    max_len: int,
    batch_size: int = 16,
    by_length: bool = False,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(N,) fp32 raw rewards of (prompt messages, response) items, computed on the model's device.

    `by_length` batches items of similar token counts together (far less padding on a file of mixed lengths); the
    result keeps the order of `items` either way. `progress(n)` is told each batch's size."""
    end_id = model.end_token_id if model.end_token_id is not None else tokenizer.eod_id
    device = model.score.weight.device
    seqs = [encode_response(p, r, tokenizer, max_len, end_id)[:2] for p, r in items]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0])) if by_length else list(range(len(seqs)))
    out = torch.empty(len(seqs), dtype=torch.float32, device=device)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate_sequences([seqs[j] for j in chunk], tokenizer.pad_id).items()}
        rewards = model(batch["input_ids"], batch["attention_mask"], batch["response_mask"]).rewards
        out[torch.tensor(chunk, device=device)] = rewards.float()
        if progress is not None:
            progress(len(chunk))
    return out


def load_for_scoring(model_dir: str | Path) -> RewardModel:
    """The reward model on this machine's device: a GPU in bf16 (its head in fp32) when there is one, else the
    CPU in fp32."""
    from align.core.distributed import device

    where = device()
    return load_reward_model(model_dir, torch.bfloat16 if where.type == "cuda" else torch.float32, where)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="response", disable=total < 256)


def pair_metrics(pairs: list[Pair], chosen: list[float], rejected: list[float], bins: int = 10) -> dict:
    margins = [c - r for c, r in zip(chosen, rejected)]
    correct = [m > 0 for m in margins]
    n = len(pairs)

    def summary(idx: list[int]) -> dict:
        k = sum(correct[i] for i in idx)
        lo, hi = wilson_interval(k, len(idx))
        return {"n": len(idx), "accuracy": k / len(idx) if idx else float("nan"), "ci95": [lo, hi]}

    by_tag, by_source = defaultdict(list), defaultdict(list)
    for i, p in enumerate(pairs):
        for t in p.tags or ["(untagged)"]:
            by_tag[t].append(i)
        by_source[p.source or "(none)"].append(i)
    longer = [len(p.chosen) > len(p.rejected) for p in pairs]
    ties = sum(len(p.chosen) == len(p.rejected) for p in pairs)
    calibration = []
    probs = [1 / (1 + math.exp(-m)) if m > -50 else 0.0 for m in margins]
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            calibration.append(
                {
                    "bin": [lo, hi],
                    "n": len(idx),
                    "mean_predicted": sum(probs[i] for i in idx) / len(idx),
                    "observed": sum(1 for i in idx if correct[i]) / len(idx),
                }
            )
    sorted_m = sorted(margins)
    q = lambda f: sorted_m[min(int(f * (n - 1) + 0.5), n - 1)]
    return {
        "n_pairs": n,
        "overall": summary(list(range(n))),
        "per_tag": {t: summary(i) for t, i in sorted(by_tag.items())},
        "per_source": {s: summary(i) for s, i in sorted(by_source.items())},
        "length_baseline": {"accuracy": (sum(longer) + 0.5 * ties) / n, "rule": "prefer the longer response"},
        "margin": {"mean": sum(margins) / n, "p05": q(0.05), "p50": q(0.5), "p95": q(0.95)},
        "calibration": calibration,
        "margins": margins,
    }


def _plot_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(metrics: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.hist(metrics["margins"], bins=40, color="#3b7dd8")
    ax1.axvline(0, color="k", lw=1)
    ax1.set_title("reward margin r(chosen) - r(rejected)")
    cal = metrics["calibration"]
    ax2.plot([0, 1], [0, 1], "k--", lw=1)
    ax2.plot([c["mean_predicted"] for c in cal], [c["observed"] for c in cal], "o-", color="#d8553b")
    ax2.set_xlabel("predicted P(chosen preferred)")
    ax2.set_ylabel("observed")
    ax2.set_title("calibration")
    png = _plot_png(fig)
    plt.close(fig)
    o = metrics["overall"]
    rows = lambda d: "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['n']}</td><td>{v['accuracy']:.4f}</td>"
        f"<td>[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]</td></tr>"
        for k, v in d.items()
    )
    head = "<tr><th></th><th>pairs</th><th>accuracy</th><th>95% CI</th></tr>"
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p id="overall">Pairwise accuracy <b>{o["accuracy"]:.4f}</b> over {o["n"]} pairs (95% CI [{o["ci95"][0]:.4f},
{o["ci95"][1]:.4f}]). Length-only baseline: {metrics["length_baseline"]["accuracy"]:.4f}.</p>
<img src="data:image/png;base64,{png}" alt="margins and calibration">
<h2>Per source</h2><table>{head}{rows(metrics["per_source"])}</table>
<h2>Per tag</h2><table>{head}{rows(metrics["per_tag"])}</table>
</body></html>"""
    path.write_text(body)


def evaluate_file(
    model_dir: str,
    data: str,
    max_len: int = 2048,
    batch_size: int = 16,
    report: Path | None = None,
    on_error: str = "skip",
) -> dict:
    """Pairwise accuracy and the rest of `pair_metrics` on a preference file; records the reader leaves out
    (`on_error="skip"`) are counted under `left_out`, with the first few named in `left_out_examples`."""
    model = load_for_scoring(model_dir)
    tokenizer = QwenTokenizer.from_file(Path(model_dir))
    pairs, read = load_pairs(data, binarize=False, on_error=on_error)
    items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    with _bar(len(items), "rm eval") as bar:
        scores = score_texts(model, tokenizer, items, max_len, batch_size, by_length=True, progress=bar.update)
    chosen, rejected = scores[: len(pairs)].tolist(), scores[len(pairs) :].tolist()
    metrics = pair_metrics(pairs, chosen, rejected)
    metrics["left_out"], metrics["left_out_examples"] = dict(read.skipped), read.examples
    if report is not None:
        write_report(metrics, report, f"Reward model {model_dir} on {data}")
    return metrics


def score_file(
    model_dir: str, data: str, out: str, max_len: int = 2048, batch_size: int = 16, normalise: bool = False
) -> int:
    """Score {"prompt": messages|str, "response": str} or {"messages": [..., assistant]} records into `out`."""
    model = load_for_scoring(model_dir)
    tokenizer = QwenTokenizer.from_file(Path(model_dir))
    records, items = [], []
    for where, rec in iter_records(data):
        if "messages" in rec:
            msgs = rec["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise DataError(f"{where}: field 'messages' must end with an assistant message")
            items.append((msgs[:-1], msgs[-1]["content"]))
        elif "response" in rec and "prompt" in rec:
            items.append((as_messages(rec["prompt"], where), rec["response"]))
        else:
            raise DataError(f"{where}: expected 'messages' or 'prompt' + 'response'")
        records.append(rec)
    with _bar(len(items), "rm score") as bar:
        rewards = score_texts(model, tokenizer, items, max_len, batch_size, by_length=True, progress=bar.update)
    rewards = (model.normalise(rewards) if normalise else rewards).tolist()
    return write_jsonl_atomic(out, ({**rec, "reward": r} for rec, r in zip(records, rewards)))


def dump_metrics(metrics: dict) -> str:
    return json.dumps({k: v for k, v in metrics.items() if k != "margins"}, indent=2)
