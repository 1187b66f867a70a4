"""What a tag-balanced sample contains, for safety reviewers: `align tags audit`.

Coverage, entropy and Gini of the tag distribution, the most over- and under-represented tags against the
original pool, tags with fewer than k examples, per-tag counts before and after sampling, coverage of the `safety`
subtree, and, where labels exist, the flagged-unsafe rate and annotator agreement per tag. Writes `report.html`
(plots) and `figures.csv` (every figure in the report) plus `tags.csv` (the per-tag table).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from align.core.records import iter_records
from rm.tags.taxonomy import Taxonomy


def gini(values: list[float]) -> float:
    """Gini coefficient of non-negative values (0 = perfectly even)."""
    xs = sorted(values)
    n, total = len(xs), sum(xs)
    if n == 0 or total == 0:
        return 0.0
    return sum((2 * (i + 1) - n - 1) * x for i, x in enumerate(xs)) / (n * total)


def entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c) if total else 0.0


def ranking_agreement(rankings: list[list[int]]) -> float | None:
    """Mean over annotator pairs of the fraction of response pairs they order the same way (ties count as an
    order)."""
    if len(rankings) < 2:
        return None
    sign = lambda a, b: (a > b) - (a < b)
    scores = []
    for r1, r2 in combinations(rankings, 2):
        pairs = list(combinations(range(min(len(r1), len(r2))), 2))
        if pairs:
            scores.append(sum(sign(r1[i], r1[j]) == sign(r2[i], r2[j]) for i, j in pairs) / len(pairs))
    return sum(scores) / len(scores) if scores else None


def _rows(path) -> list[dict]:
    return [row for _, row in iter_records(path)]


def remap(rows: list[dict], taxonomy: Taxonomy) -> tuple[list[dict], Counter]:
    """The rows with their tags read in another taxonomy version (ids, names and aliases; a merged tag resolves to
    the tag it was merged into when the new version lists it as an alias); the tags it does not know, counted."""
    unknown: Counter = Counter()
    out = []
    for r in rows:
        tags = []
        for t in r.get("tags") or []:
            resolved = taxonomy.resolve(t)
            if resolved is None:
                unknown[t] += 1
            else:
                tags.append(resolved)
        out.append({**r, "tags": tags})
    return out, unknown


def compare(
    dataset: str | Path,
    other: str | Path | None,
    out_dir: str | Path,
    taxonomy: Taxonomy | None = None,
    other_taxonomy: Taxonomy | None = None,
    k: int = 5,
) -> dict:
    """Two samples (`other`), or one sample read in two taxonomy versions (`other_taxonomy`), side by side: each
    one's figures, and per tag the share before and after. Writes `comparison.csv` and `comparison.html`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = audit(dataset, out_dir / "before", taxonomy=taxonomy, k=k)
    rows = _rows(other if other is not None else dataset)
    unknown: Counter = Counter()
    if other_taxonomy is not None:
        rows, unknown = remap(rows, other_taxonomy)
    after = audit(rows, out_dir / "after", taxonomy=other_taxonomy or taxonomy, k=k)
    keys = ["rows", "distinct_tags", "reference_tags", "coverage", "entropy", "gini", "tags_under_k", "safety_tags",
            "safety_coverage", "max_min_ratio"]  # fmt: skip
    figures = [{"figure": key, "before": before["figures"][key], "after": after["figures"][key],
                "change": _change(before["figures"][key], after["figures"][key])} for key in keys]  # fmt: skip
    if unknown:
        figures.append({"figure": "tags unknown to the other taxonomy", "before": 0, "after": sum(unknown.values()),
                        "change": ", ".join(t for t, _ in unknown.most_common(10))})  # fmt: skip
    b = {r["tag"]: r for r in before["tags"]}
    a = {r["tag"]: r for r in after["tags"]}
    per_tag = [{"tag": t, "before_count": b.get(t, {}).get("count", 0), "after_count": a.get(t, {}).get("count", 0),
                "before_share": b.get(t, {}).get("share", 0.0), "after_share": a.get(t, {}).get("share", 0.0)}
               for t in sorted(set(a) | set(b))]  # fmt: skip
    for r in per_tag:
        r["share_change"] = r["after_share"] - r["before_share"]
    per_tag.sort(key=lambda r: -abs(r["share_change"]))
    _write_csv(out_dir / "comparison.csv", figures)
    _write_csv(out_dir / "comparison_tags.csv", per_tag)
    fig_rows = "".join(f"<tr><td>{html.escape(str(f['figure']))}</td><td class='v'>{_fmt(f['before'])}</td>"
                       f"<td class='v'>{_fmt(f['after'])}</td><td class='v'>{_fmt(f['change'])}</td></tr>" for f in figures)  # fmt: skip
    tag_rows = "".join(f"<tr><td>{html.escape(r['tag'])}</td><td class='v'>{r['before_count']}</td>"
                       f"<td class='v'>{r['after_count']}</td><td class='v'>{_fmt(r['share_change'])}</td></tr>"
                       for r in per_tag[:500])  # fmt: skip
    (out_dir / "comparison.html").write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>Tag audit: comparison</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}td.v{{text-align:right}}</style></head><body>
<h1>Before and after</h1><p>Before: <a href="before/report.html">{html.escape(str(dataset))}</a>; after:
<a href="after/report.html">{html.escape(str(other or dataset))}</a>{" read in the other taxonomy" if other_taxonomy else ""}.</p>
<table id="comparison"><tr><th>figure</th><th>before</th><th>after</th><th>change</th></tr>{fig_rows}</table>
<h2>Tags whose share changed most</h2><table id="tag-changes"><tr><th>tag</th><th>before</th><th>after</th>
<th>share change</th></tr>{tag_rows}</table></body></html>""",
        encoding="utf-8",
    )
    return {"figures": figures, "tags": per_tag, "before": before, "after": after}


def _change(before, after):
    try:
        return after - before
    except TypeError:
        return ""


def audit(
    dataset: str | Path | list[dict],
    out_dir: str | Path,
    against: str | Path | None = None,
    taxonomy: Taxonomy | None = None,
    k: int = 5,
    safety_root: str = "safety",
) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = dataset if isinstance(dataset, list) else _rows(dataset)
    counts = Counter(t for r in rows for t in set(r.get("tags") or []))
    original = Counter(t for r in _rows(against) for t in set(r.get("tags") or [])) if against else None
    if taxonomy is not None:
        universe = set(taxonomy.leaves())
    elif original is not None:
        universe = set(original)
    else:
        universe = set(counts)
    universe |= set(counts)
    all_tags = sorted(universe)

    total = sum(counts.values())
    figures: dict[str, float] = {
        "rows": len(rows),
        "tag_assignments": total,
        "distinct_tags": len(counts),
        "reference_tags": len(universe),
        "coverage": len(counts) / len(universe) if universe else 0.0,
        "entropy": entropy([counts[t] for t in all_tags]),
        "gini": gini([counts[t] for t in all_tags]),
        "tags_under_k": sum(1 for t in all_tags if counts[t] < k),
        "k": k,
        "max_min_ratio": (max(counts.values()) / min(counts.values())) if counts else float("nan"),
    }
    safety = [
        t
        for t in all_tags
        if (
            taxonomy.in_subtree(t, safety_root)
            if taxonomy and t in taxonomy
            else t == safety_root or t.startswith(safety_root + "/")
        )
    ]
    figures["safety_tags"] = len(safety)
    figures["safety_coverage"] = (sum(1 for t in safety if counts[t]) / len(safety)) if safety else float("nan")

    unsafe = defaultdict(lambda: [0, 0])
    agreement = defaultdict(list)
    for r in rows:
        flag = r.get("unsafe")
        rankings = [a["ranking"] for a in r.get("annotations") or [] if isinstance(a, dict) and "ranking" in a]
        agree = ranking_agreement(rankings)
        for t in set(r.get("tags") or []):
            if flag is not None:
                unsafe[t][0] += int(bool(flag))
                unsafe[t][1] += 1
            if agree is not None:
                agreement[t].append(agree)

    share = lambda c, t, tot: c[t] / tot if tot else 0.0
    orig_total = sum(original.values()) if original else 0
    table = []
    for t in all_tags:
        row = {
            "tag": t,
            "count": counts[t],
            "share": share(counts, t, total),
            "under_k": int(counts[t] < k),
            "safety": int(t in safety),
        }
        if original is not None:
            row["original_count"] = original[t]
            row["original_share"] = share(original, t, orig_total)
            row["representation"] = (row["share"] / row["original_share"]) if row["original_share"] else float("nan")
        if t in unsafe:
            row["unsafe_rate"] = unsafe[t][0] / unsafe[t][1]
        if t in agreement:
            row["agreement"] = sum(agreement[t]) / len(agreement[t])
        table.append(row)
    if original is not None:
        ranked = sorted((r for r in table if r["original_count"]), key=lambda r: r["representation"])
        figures["most_under_represented"] = ", ".join(r["tag"] for r in ranked[:10] if r["representation"] < 1)
        figures["most_over_represented"] = ", ".join(r["tag"] for r in ranked[::-1][:10] if r["representation"] > 1)
    else:
        uniform = 1 / len(all_tags) if all_tags else 0
        ranked = sorted(table, key=lambda r: r["share"])
        figures["most_under_represented"] = ", ".join(r["tag"] for r in ranked[:10] if r["share"] < uniform)
        figures["most_over_represented"] = ", ".join(r["tag"] for r in ranked[::-1][:10] if r["share"] > uniform)

    _write_csv(out_dir / "figures.csv", [{"figure": k, "value": v} for k, v in figures.items()])
    _write_csv(out_dir / "tags.csv", table)
    tree = _safety_tree(taxonomy, counts, safety_root) if taxonomy is not None and safety_root in taxonomy else ""
    _write_html(out_dir / "report.html", figures, table, original is not None, tree)
    return {"figures": figures, "tags": table}


def _safety_tree(taxonomy: Taxonomy, counts: Counter, root: str) -> str:
    """The safety subtree as nested lists: each node with its own examples and its subtree's."""

    def total(node: str) -> int:
        return counts[node] + sum(total(c) for c in taxonomy.children[node])

    def item(node: str) -> str:
        kids = sorted(taxonomy.children[node], key=lambda c: (-total(c), c))
        inner = f"<ul>{''.join(item(c) for c in kids)}</ul>" if kids else ""
        name = taxonomy.tags[node].name
        mark = " class='empty'" if total(node) == 0 else ""
        return (f"<li{mark} data-tag='{html.escape(node)}'><b>{html.escape(name)}</b> "
                f"<span class='n'>{total(node)}</span>{f' ({counts[node]} here)' if kids and counts[node] else ''}{inner}</li>")  # fmt: skip

    return f"<h2>Safety subtree</h2><ul id='safety-tree'>{item(root)}</ul>"


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _plot(table: list[dict], has_original: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = sorted(table, key=lambda r: -(r.get("original_count", r["count"])))[:30]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(top))
    if has_original:
        ax1.bar([i - 0.2 for i in x], [r["original_share"] for r in top], width=0.4, label="original")
    ax1.bar([i + 0.2 for i in x], [r["share"] for r in top], width=0.4, label="sample")
    ax1.set_xticks(list(x), [r["tag"] for r in top], rotation=90, fontsize=6)
    ax1.set_title("share of tag assignments (30 most frequent tags)")
    ax1.legend()
    ax2.hist([r["count"] for r in table], bins=40, log=True)
    ax2.set_title("examples per tag in the sample")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else html.escape(str(v))


def _write_html(path: Path, figures: dict, table: list[dict], has_original: bool, tree: str = "") -> None:
    keys = list(dict.fromkeys(k for r in table for k in r))
    fig_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td class='v' data-figure='{html.escape(k)}'>{_fmt(v)}</td></tr>"
        for k, v in figures.items()
    )
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in table[:2000])
    path.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>Tag audit</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}td.v{{text-align:right}}li.empty{{color:#b00}}
#safety-tree .n{{background:#eef;padding:0 4px;border-radius:3px}}</style></head><body>
<h1>Tag audit</h1><table id="figures">{fig_rows}</table>
<img src="data:image/png;base64,{_plot(table, has_original)}" alt="tag distribution">{tree}
<h2>Per tag</h2><p>{len(table)} tags{" (first 2000 shown; all in tags.csv)" if len(table) > 2000 else ""}</p>
<table id="tags"><tr>{head}</tr>{body}</table></body></html>""",
        encoding="utf-8",
    )
