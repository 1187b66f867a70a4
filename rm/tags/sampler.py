"""Tag-balanced sampling over sparse tag matrices: `align tags sample`.

- complexity-first (InsTag): order queries by number of tags (most first); make passes over the remaining queries,
  each taking every query that brings a tag not yet seen in that pass, until N are taken.
- capped: queries in random order, each taken while none of its tags has reached the cap; without a cap, the
  cap rises from n / (number of tags) until n are taken (water-filling: as flat as the pool allows).
- temperature: T5-style; a query's weight is the mean over its tags of freq^(1/T) / freq, sampled without
  replacement (Gumbel top-k). T = 1 is uniform over queries; larger T flattens the tag distribution.

A pass of complexity-first is vectorised: a query is taken in a pass exactly when it is the first remaining query
(in pass order) that carries one of its tags, so each pass is a per-tag minimum over the sparse matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp

Method = Literal["complexity-first", "capped", "temperature"]


def tag_matrix(rows_tags: Sequence[Sequence[str]]) -> tuple[sp.csr_matrix, list[str]]:
    """Queries x tags 0/1 matrix (CSR) and the tag names of its columns."""
    vocab: dict[str, int] = {}
    indptr, indices = [0], []
    for tags in rows_tags:
        cols = sorted({vocab.setdefault(t, len(vocab)) for t in tags})
        indices.extend(cols)
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.int8)
    m = sp.csr_matrix(
        (data, np.asarray(indices, dtype=np.int64), np.asarray(indptr, dtype=np.int64)),
        shape=(len(rows_tags), len(vocab)),
    )
    return m, list(vocab)


def complexity_first(m: sp.csr_matrix, n: int, seed: int = 0) -> np.ndarray:
    """Indices of the selected queries, in selection order. Deterministic (no randomness is involved)."""
    n_tags = np.diff(m.indptr)
    order = np.argsort(-n_tags, kind="stable")  # most tags first; ties keep the input order (InsTag)
    rank = np.empty(m.shape[0], dtype=np.int64)
    rank[order] = np.arange(m.shape[0])
    coo = m.tocoo()
    q_row, q_rank, q_tag = coo.row, rank[coo.row], coo.col.astype(np.int64)
    remaining = np.ones(m.shape[0], dtype=bool)
    remaining[n_tags == 0] = False  # untagged queries add no tag; they come last, in order
    selected: list[np.ndarray] = []
    taken = 0
    while taken < n:
        live = remaining[q_row]
        if not live.any():
            break
        r, t = q_rank[live], q_tag[live]
        first = np.full(m.shape[1], np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, t, r)
        ranks = np.unique(first[first != np.iinfo(np.int64).max])  # sorted: selection order within the pass
        ranks = ranks[: n - taken]
        chosen = order[ranks]
        selected.append(chosen)
        remaining[chosen] = False
        taken += len(chosen)
    if taken < n:  # every tagged query is taken; fill with untagged ones in pass order
        rest = order[remaining[order] | (n_tags[order] == 0)]
        rest = rest[~np.isin(rest, np.concatenate(selected) if selected else [])]
        selected.append(rest[: n - taken])
    return np.concatenate(selected) if selected else np.zeros(0, dtype=np.int64)


def capped(m: sp.csr_matrix, n: int, cap: int | None = None, seed: int = 0, chunk: int = 4096) -> np.ndarray:
    """Queries in a seeded random order, each taken only while every one of its tags is under the cap.

    Without a cap, water-filling: start at n / (number of tags) and double the cap until n queries are taken,
    so the sample is as flat as the pool allows. Vectorised over chunks; within a chunk a query is refused as soon
    as an earlier query of the chunk could fill one of its tags, so a cap is never exceeded."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(m.shape[0])
    counts = np.zeros(m.shape[1], dtype=np.int64)
    taken = np.zeros(m.shape[0], dtype=bool)
    out: list[np.ndarray] = []
    n_out = 0
    present = max(int((np.diff(m.tocsc().indptr) > 0).sum()), 1)
    level = cap if cap is not None else max(1, -(-n // present))
    while n_out < n:
        for start in range(0, len(perm), chunk):
            idx = perm[start : start + chunk]
            idx = idx[~taken[idx]]
            if not len(idx):
                continue
            coo = m[idx].tocoo()
            rows, cols = coo.row, coo.col
            blocked = np.zeros(len(idx), dtype=bool)
            blocked[rows[counts[cols] >= level]] = True
            keep = ~blocked[rows]
            rows, cols = rows[keep], cols[keep]
            order = np.lexsort((rows, cols))  # by tag, then by position in the chunk
            rows, cols = rows[order], cols[order]
            tag_start = np.searchsorted(cols, cols, side="left")
            occurrence = np.arange(len(cols)) - tag_start
            blocked[rows[occurrence >= level - counts[cols]]] = True
            accepted = np.flatnonzero(~blocked)[: n - n_out]
            chosen = idx[accepted]
            np.add.at(counts, m[chosen].indices, 1)
            taken[chosen] = True
            out.append(chosen)
            n_out += len(chosen)
            if n_out >= n:
                break
        if cap is not None or taken.all():
            break
        level *= 2
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def temperature(m: sp.csr_matrix, n: int, temp: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    freq = np.asarray(m.sum(0)).ravel().astype(np.float64)
    per_tag = np.where(freq > 0, freq ** (1.0 / temp) / np.maximum(freq, 1), 0.0)
    n_tags = np.diff(m.indptr)
    weight = (m.astype(np.float64) @ per_tag) / np.maximum(n_tags, 1)
    weight[n_tags == 0] = per_tag[per_tag > 0].min() if (per_tag > 0).any() else 1.0
    keys = np.log(weight) + rng.gumbel(size=m.shape[0])
    n = min(n, m.shape[0])
    top = np.argpartition(-keys, n - 1)[:n] if n else np.zeros(0, dtype=np.int64)
    return top[np.argsort(-keys[top])]


def sample(
    m: sp.csr_matrix, n: int, method: Method, seed: int = 0, cap: int | None = None, temp: float = 2.0
) -> np.ndarray:
    if method == "complexity-first":
        return complexity_first(m, n, seed)
    if method == "capped":
        return capped(m, n, cap, seed)
    return temperature(m, n, temp, seed)


def max_min_ratio(m: sp.csr_matrix, rows: np.ndarray) -> float:
    """max / min tag frequency in a sample, over the tags it contains."""
    counts = np.asarray(m[rows].sum(0)).ravel()
    counts = counts[counts > 0]
    return float(counts.max() / counts.min()) if len(counts) else float("nan")


def zipf_pool(n_queries: int, n_tags: int, seed: int = 0, exponent: float = 1.1, max_tags: int = 5) -> sp.csr_matrix:
    """A generated pool: each query carries 1..max_tags distinct tags drawn from a Zipf distribution."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_tags + 1) ** exponent
    p /= p.sum()
    k = rng.integers(1, max_tags + 1, size=n_queries)
    cols = rng.choice(n_tags, size=int(k.sum()), p=p)
    rows = np.repeat(np.arange(n_queries), k)
    m = sp.csr_matrix((np.ones(len(cols), dtype=np.int8), (rows, cols)), shape=(n_queries, n_tags))
    m.sum_duplicates()
    m.data[:] = 1
    return m
