"""From open-set raw tags to a taxonomy, following InsTag's four steps: `align tags build`.

1. frequency filter: drop raw tags seen fewer than `alpha` times (InsTag's 20 by default), all the spellings that
   step 2 makes one tag counted together;
2. rule aggregation: tags equal after lower-casing, dropping punctuation and stemming each word are one tag;
3. semantic aggregation: MiniLM embeddings clustered with DBSCAN (cosine distance `eps`);
4. association aggregation: FP-Growth rules A -> B and B -> A both above `min_confidence` merge B into A.

Each merge is reported (step, kept tag, merged tags, evidence) so a reviewer can undo it. The canonical name of a
group is its most frequent member.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import snowballstemmer

from rm.tags.taxonomy import CONTROL, Tag, Taxonomy

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


@dataclass
class BuildResult:
    taxonomy: Taxonomy
    mapping: dict[str, str]  # raw tag -> kept tag (dropped raw tags are absent)
    merges: list[dict] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # raw tag -> count, below alpha


def rule_key(tag: str, stemmer=snowballstemmer.stemmer("english")) -> str:
    words = _PUNCT.sub(" ", tag.lower().replace("_", " ").replace("-", " ")).split()
    return " ".join(stemmer.stemWords(words))


class _Groups:
    """Union of raw tags into groups; the representative is the most frequent member."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts
        self.parent = {t: t for t in counts}

    def find(self, t: str) -> str:
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def members(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.parent:
            out.setdefault(self.find(t), []).append(t)
        return out

    def sizes(self) -> Counter:
        """Each group's frequency: the sum over its members."""
        out: Counter = Counter()
        for t, c in self.counts.items():
            out[self.find(t)] += c
        return out

    def merge(self, tags: list[str]) -> str:
        roots = sorted({self.find(t) for t in tags}, key=lambda r: (-self.counts[r], r))
        for r in roots[1:]:
            self.parent[r] = roots[0]
        return roots[0]


def build(
    raw: list[list[str]],
    alpha: int = 20,  # InsTag's frequency threshold
    eps: float = 0.3,
    min_confidence: float = 0.95,
    min_support: float = 0.001,
    semantic: bool = True,
    association: bool = True,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> BuildResult:
    """`raw` holds the open-set tags of each query; `embed` the semantic step's embedder (MiniLM by default; an
    `EmbeddingCache` keeps its vectors on disk); `log` hears each step's outcome and time."""
    t0 = time.perf_counter()
    counts = Counter(t.strip() for tags in raw for t in tags if t.strip())
    unreadable = [t for t in counts if CONTROL.search(t)]  # a tag name cannot hold a control character
    for t in unreadable:
        del counts[t]
    if unreadable:
        log(f"{len(unreadable)} raw tags with control characters left out (e.g. {unreadable[0]!r})")
    keys = {t: rule_key(t) for t in counts}
    # the frequency of a tag is that of all its spellings (the same after step 2's normalisation)
    key_counts: Counter = Counter()
    for t, c in counts.items():
        key_counts[keys[t]] += c
    kept = Counter({t: c for t, c in counts.items() if key_counts[keys[t]] >= alpha})
    dropped = {t: c for t, c in counts.items() if key_counts[keys[t]] < alpha}
    log(f"frequency: {len(counts)} raw tags, {len(dropped)} seen fewer than {alpha} times dropped "
        f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    groups = _Groups(kept)
    merges: list[dict] = []

    t0 = time.perf_counter()
    by_key: dict[str, list[str]] = {}
    for t in kept:
        by_key.setdefault(keys[t], []).append(t)
    for key, tags in sorted(by_key.items()):
        if len(tags) > 1:
            into = groups.merge(tags)
            merges.append(
                {
                    "step": "rule",
                    "into": into,
                    "merged": sorted(t for t in tags if t != into),
                    "evidence": f"same after lower-casing, punctuation and stemming: {key!r}",
                }
            )

    log(f"rule: {len(kept)} tags → {len(by_key)} ({time.perf_counter() - t0:.1f} s)")
    if semantic and len(by_key) > 1:
        t0, before = time.perf_counter(), len(merges)
        _semantic(groups, eps, merges, embed)
        log(f"semantic: {len(merges) - before} clusters merged → {len(groups.members())} tags "
            f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    if association:
        t0, before = time.perf_counter(), len(merges)
        _association(raw, groups, min_confidence, min_support, merges)
        log(f"association: {len(merges) - before} pairs merged → {len(groups.members())} tags "
            f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip

    members = groups.members()
    sizes = groups.sizes()
    mapping = {t: root for root, ts in members.items() for t in ts}
    tags = [
        Tag(root, root, None, sorted(t for t in ts if t != root))
        for root, ts in sorted(members.items(), key=lambda x: (-sizes[x[0]], x[0]))
    ]
    return BuildResult(Taxonomy(tags, "<built>"), mapping, merges, dropped)


def _semantic(groups: _Groups, eps: float, merges: list[dict], embed=None) -> None:
    from sklearn.cluster import DBSCAN

    if embed is None:
        from rm.tags.embed import embed

    roots = sorted(groups.members())
    vectors = embed(roots)
    labels = DBSCAN(eps=eps, min_samples=2, metric="cosine").fit_predict(vectors)
    for label in sorted(set(labels) - {-1}):
        cluster = [roots[i] for i in range(len(roots)) if labels[i] == label]
        into = groups.merge(cluster)
        merges.append(
            {
                "step": "semantic",
                "into": into,
                "merged": sorted(t for t in cluster if t != into),
                "evidence": f"MiniLM embeddings within cosine distance {eps} (DBSCAN)",
            }
        )


def _association(
    raw: list[list[str]], groups: _Groups, min_confidence: float, min_support: float, merges: list[dict]
) -> None:
    import pandas as pd
    from mlxtend.frequent_patterns import association_rules, fpgrowth
    from mlxtend.preprocessing import TransactionEncoder

    baskets = [sorted({groups.find(t.strip()) for t in tags if t.strip() in groups.parent}) for tags in raw]
    baskets = [b for b in baskets if b]
    if len(baskets) < 2:
        return
    # a tag below the support threshold is in no frequent itemset: only the others are encoded, as a sparse matrix
    # (a million queries over thousands of tags would not fit in memory dense)
    n_min = min_support * len(baskets)
    frequent_tags = {t for t, c in Counter(t for b in baskets for t in b).items() if c >= n_min}
    baskets = [[t for t in b if t in frequent_tags] for b in baskets]
    if len(frequent_tags) < 2:
        return
    enc = TransactionEncoder()
    frame = pd.DataFrame.sparse.from_spmatrix(enc.fit(baskets).transform(baskets, sparse=True), columns=enc.columns_)
    frequent = fpgrowth(frame, min_support=min_support, use_colnames=True, max_len=2)
    if frequent.empty or (frequent["itemsets"].map(len) == 2).sum() == 0:
        return
    rules = association_rules(frequent, metric="confidence", min_threshold=min_confidence)
    one_to_one = rules[(rules["antecedents"].map(len) == 1) & (rules["consequents"].map(len) == 1)]
    pairs = {
        (next(iter(a)), next(iter(c))): conf
        for a, c, conf in zip(one_to_one["antecedents"], one_to_one["consequents"], one_to_one["confidence"])
    }
    for (a, b), conf in sorted(pairs.items()):
        if a < b and (b, a) in pairs and groups.find(a) != groups.find(b):
            into = groups.merge([a, b])
            merges.append(
                {
                    "step": "association",
                    "into": into,
                    "merged": [b if into == a else a],
                    "evidence": f"FP-Growth: confidence {conf:.2f} and {pairs[(b, a)]:.2f} both ways",
                }
            )


def build_folder(
    raw: list[list[str]],
    out: Path,
    hierarchy: dict | None = None,
    embed_cache: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
    **options,
) -> dict:
    """`align tags build`: `build(raw, **options)`, then (given `hierarchy`, the options of `add_hierarchy`) the
    categories, domains and safety subtree; writes taxonomy.yaml, merges.jsonl, mapping.json (and placements.jsonl)
    in `out`, embeddings cached in `embed_cache`. Returns what it did, with timings."""
    from base_model.atomic import write_json_atomic, write_rows_atomic
    from rm.tags.embed import EmbeddingCache

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = EmbeddingCache(embed_cache) if embed_cache is not None else None
    try:
        result = build(raw, embed=cache, log=log, **options)
        taxonomy = result.taxonomy
        report = {"raw_kept": len(result.mapping), "raw_dropped": len(result.dropped), "tags": len(taxonomy),
                  "merges": len(result.merges)}  # fmt: skip
        if hierarchy is not None:
            from rm.tags.hierarchy import add_hierarchy

            t0 = time.perf_counter()
            counts = Counter(result.mapping[t] for tags in raw for t in tags if t in result.mapping)
            taxonomy, placements = add_hierarchy(taxonomy, counts, embed=cache, **hierarchy)
            write_rows_atomic(out / "placements.jsonl", placements)
            report["nodes"] = len(taxonomy)
            log(f"hierarchy: {len(taxonomy)} nodes ({time.perf_counter() - t0:.1f} s)")
    finally:
        if cache is not None:
            cache.close()
    taxonomy.save(out / "taxonomy.yaml")
    write_rows_atomic(out / "merges.jsonl", result.merges)
    write_json_atomic(out / "mapping.json", result.mapping)
    report["seconds"] = time.perf_counter() - t_start
    return report
