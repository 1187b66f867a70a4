"""Agreement between annotators on rankings: Kendall's W, pairwise agreement, Krippendorff's alpha (ordinal).

A ranking is a list of ranks, one per response, 1 = best, equal numbers = tie. Each statistic is computed over the
items that at least two annotators ranked; an item ranked by one person says nothing about agreement.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from statistics import median

import krippendorff
import numpy as np
from scipy.stats import rankdata

from labeling_ui.export import merge_rankings


def kendalls_w(rankings: list[list[int]]) -> float | None:
    """Kendall's coefficient of concordance with the tie correction, for m rankings of the same n responses.

    W = 12 S / (m^2 (n^3 - n) - m sum_j T_j), S = sum over responses of (R_i - mean R)^2 with R_i the sum of
    (average-tie) ranks, T_j = sum over tie groups of rater j of (t^3 - t). 1 = identical rankings, 0 = none."""
    m, n = len(rankings), len(rankings[0]) if rankings else 0
    if m < 2 or n < 2:
        return None
    ranks = np.array([rankdata(r, method="average") for r in rankings])  # [m, n]
    totals = ranks.sum(axis=0)
    s = float(((totals - totals.mean()) ** 2).sum())
    ties = sum(float((c**3 - c).sum()) for r in rankings for c in [np.unique(r, return_counts=True)[1]])
    denom = m**2 * (n**3 - n) - m * ties
    return s * 12 / denom if denom > 0 else None


def _order(ranks: list[int], i: int, j: int) -> int:
    return (ranks[i] < ranks[j]) - (ranks[i] > ranks[j])


def pairwise_agreement(rankings: list[list[int]]) -> float | None:
    """Share of (annotator pair, response pair) cases where both put the two responses in the same order
    (a tie counts as its own order)."""
    if len(rankings) < 2:
        return None
    k = len(rankings[0])
    same = [
        _order(a, i, j) == _order(b, i, j) for a, b in combinations(rankings, 2) for i, j in combinations(range(k), 2)
    ]
    return sum(same) / len(same) if same else None


def krippendorff_alpha(items: list[dict[str, list[int]]]) -> float | None:
    """Krippendorff's alpha with the ordinal metric. `items` maps annotator -> ranks, one dict per item; each
    (item, response) is a unit, each annotator a coder, missing values where an annotator did not rank the item."""
    items = [it for it in items if len(it) >= 2]
    if not items:
        return None
    coders = sorted({a for it in items for a in it})
    units = [(it, r) for it in items for r in range(len(next(iter(it.values()))))]
    data = np.full((len(coders), len(units)), np.nan)
    for u, (it, r) in enumerate(units):
        for a, ranks in it.items():
            data[coders.index(a), u] = ranks[r]
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return 1.0  # everyone gave every response the same rank: no disagreement to measure
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def agreement(items: list[dict[str, list[int]]]) -> dict:
    """The three statistics over items (annotator -> ranks); W and pairwise agreement averaged over items."""
    multi = [it for it in items if len(it) >= 2]
    return {
        "items": len(items),
        "items_multi": len(multi),
        "kendall_w": _mean([kendalls_w(list(it.values())) for it in multi]),
        "pairwise": _mean([pairwise_agreement(list(it.values())) for it in multi]),
        "krippendorff_alpha": krippendorff_alpha(multi),
    }


def project_report(rows: list[tuple[object, list[tuple[object, str]]]]) -> dict:
    """Agreement overall and per tag, per-annotator statistics and the flagged queue, from `Store.annotations`."""
    items, by_tag, flagged = [], defaultdict(list), []
    stats: dict[str, dict] = defaultdict(lambda: {"annotations": 0, "skips": 0, "seconds": [], "agree": []})
    for task, anns in rows:
        ranked = {name: a.ranks for a, name in anns if a.ranks is not None and not a.skipped}
        for a, name in anns:
            st = stats[name]
            st["annotations"] += 1
            st["skips"] += int(a.skipped)
            if a.seconds is not None:
                st["seconds"].append(a.seconds)
            if a.unsafe or a.all_bad:
                flagged.append(
                    {
                        "task": task.id,
                        "annotator": name,
                        "unsafe": a.unsafe or "",
                        "all_bad": a.all_bad,
                        "rationale": a.rationale,
                        "prompt": _text(task.prompt)[:200],
                    }
                )
        if not ranked:
            continue
        items.append(ranked)
        for tag in sorted({t for a, _ in anns for t in (a.tags or [])} | set(task.tags or [])):
            by_tag[tag].append(ranked)
        for name, ranks in ranked.items():  # agreement with the majority of the others (leave one out)
            others = [r for n, r in ranked.items() if n != name]
            if others:
                stats[name]["agree"].append(pairwise_agreement([ranks, merge_rankings(others)]))
    annotators = [
        {
            "annotator": n,
            "annotations": st["annotations"],
            "skip_rate": st["skips"] / st["annotations"],
            "median_seconds": median(st["seconds"]) if st["seconds"] else None,
            "agreement_with_majority": _mean(st["agree"]),
        }
        for n, st in sorted(stats.items())
    ]
    return {
        "overall": agreement(items),
        "per_tag": {t: agreement(v) for t, v in sorted(by_tag.items())},
        "annotators": annotators,
        "flagged": flagged,
    }


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " / ".join(m.get("content", "") for m in prompt)
