"""Exact and near-duplicate removal: `align data dedup`.

Exact duplicates by a hash of the normalised text; near duplicates by MinHash (datasketch) and LSH banding at a
Jaccard threshold. Shingles are word 5-grams for space-separated text and character 5-grams for text that is
mostly CJK; with `code=True`, 5-grams of code tokens (identifiers, numbers, strings, operators) with comments and
layout dropped, so copies of a file that differ in formatting, comments or licence headers across repositories are
found (and exact duplicates are judged on those tokens too). Memory stays bounded on corpora larger than RAM: documents stream through once to compute signatures
(kept in a memory-mapped file) and band keys (written to bucket shards on disk); each shard is then grouped on its
own; a second stream writes the kept documents. A report names, for every cluster, the document kept, those
dropped and why.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from align.core.records import DataError, iter_documents, iter_records
from base_model.atomic import write_jsonl_atomic, write_rows_atomic

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def is_cjk(text: str) -> bool:
    letters = [c for c in text if not c.isspace()]
    return bool(letters) and len(_CJK.findall(text)) / len(letters) > 0.3


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-grams for space-separated text, character n-grams for mostly-CJK text."""
    text = normalise(text)
    if is_cjk(text):
        units = [c for c in text if not c.isspace()]
        joiner = ""
    else:
        units, joiner = text.split(" "), " "
    if len(units) <= n:
        return {joiner.join(units).encode()}
    return {joiner.join(units[i : i + n]).encode() for i in range(len(units) - n + 1)}


# one pass, strings before comments (so "a//b" stays a string) and comments before operators
_CODE = re.compile(
    r"(?P<s>\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*')"
    r"|(?P<c>/\*.*?\*/|//[^\n]*|#[^\n]*)"
    r"|(?P<t>[A-Za-z_$][\w$]*|\d[\w.]*|==|!=|<=|>=|->|=>|&&|\|\||::|\+=|-=|\S)",
    re.S,
)


def code_tokens(text: str) -> list[str]:
    """The tokens of source code in any C-, Python- or shell-like language, comments dropped."""
    return [m.group() for m in _CODE.finditer(text) if m.lastgroup != "c"]


def code_shingles(text: str, n: int = 5) -> set[bytes]:
    toks = code_tokens(text)
    if len(toks) <= n:
        return {"\x1f".join(toks).encode()}
    return {"\x1f".join(toks[i : i + n]).encode() for i in range(len(toks) - n + 1)}


@dataclass
class DedupReport:
    documents: int
    kept: int
    exact_dropped: int
    near_dropped: int
    clusters: list[dict]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earliest document represents the cluster


def dedup(
    inputs: list[str | Path],
    output: str | Path,
    threshold: float = 0.8,
    text_field: str = "text",
    num_perm: int = 128,
    n_shards: int = 64,
    report_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    code: bool = False,
) -> DedupReport:
    output = Path(output)
    bands, rows = _optimal_param(threshold, num_perm, 0.5, 0.5)
    work = Path(tempfile.mkdtemp(prefix="dedup-"))
    try:
        n, exact_of, sig_path = _signatures(inputs, text_field, num_perm, bands, rows, n_shards, work, progress, code)
        sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, num_perm))
        uf = _UnionFind(n)
        for doc, first in exact_of.items():
            uf.union(doc, first)
        near_pairs: dict[tuple[int, int], float] = {}
        for shard in sorted(work.glob("bucket-*.bin")):
            _group_shard(shard, sigs, threshold, uf, near_pairs, exact_of)
        clusters = _clusters(n, uf, exact_of, near_pairs)
        dropped = {d for c in clusters for d in c["dropped"]}
        _write_kept(inputs, output, dropped)
        report = DedupReport(
            n,
            n - len(dropped),
            sum(1 for d in dropped if d in exact_of),
            sum(1 for d in dropped if d not in exact_of),
            clusters,
        )
        if report_path is not None:
            _write_report(report, Path(report_path))
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _signatures(inputs, text_field, num_perm, bands, rows, n_shards, work: Path, progress, code: bool = False):
    """Stream documents once: exact hashes, MinHash signatures to a file, band keys to bucket shards."""
    seen_exact: dict[bytes, int] = {}
    exact_of: dict[int, int] = {}
    shard_files = [(work / f"bucket-{i:03d}.bin").open("wb") for i in range(n_shards)]
    sig_path = work / "signatures.bin"
    n = 0
    with sig_path.open("wb") as sig_file:
        for where, record, text in iter_documents(inputs, text_field):
            key = "\x1f".join(code_tokens(text)) if code else normalise(text)
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            if digest in seen_exact:
                exact_of[n] = seen_exact[digest]
            else:
                seen_exact[digest] = n
            m = MinHash(num_perm=num_perm, seed=1)
            m.update_batch(list(code_shingles(text) if code else shingles(text)))
            hv = m.hashvalues.astype(np.uint32)
            hv.tofile(sig_file)
            for b in range(bands):
                key = hashlib.blake2b(hv[b * rows : (b + 1) * rows].tobytes() + bytes([b]), digest_size=8).digest()
                shard_files[key[0] % n_shards].write(key + struct.pack("<q", n))
            n += 1
            if progress is not None and n % 1000 == 0:
                progress(n)
    for f in shard_files:
        f.close()
    if n == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents")
    return n, exact_of, sig_path


def _records(inputs):
    for path in inputs:
        yield from iter_records(path)


def _group_shard(shard: Path, sigs, threshold: float, uf: _UnionFind, near_pairs: dict, exact_of: dict) -> None:
    """Documents sharing a band key are candidates; keep the pairs whose estimated Jaccard reaches the threshold."""
    raw = np.fromfile(shard, dtype=np.dtype([("key", "V8"), ("doc", "<i8")]))
    if len(raw) < 2:
        return
    raw = raw[np.argsort(raw["key"].view("<u8"), kind="stable")]
    keys = raw["key"].view("<u8")
    boundaries = np.flatnonzero(np.diff(keys)) + 1
    for group in np.split(raw["doc"], boundaries):
        docs = [int(d) for d in group if int(d) not in exact_of]
        if len(docs) < 2:
            continue
        # all pairs in ordinary buckets; in a huge bucket (boilerplate) only neighbours, to stay linear
        candidates = (
            ((docs[i], docs[j]) for i in range(len(docs)) for j in range(i + 1, len(docs)))
            if len(docs) <= 64
            else zip(docs, docs[1:])
        )
        for a, b in candidates:
            pair = (min(a, b), max(a, b))
            if pair in near_pairs:
                continue
            jaccard = float(np.mean(sigs[a] == sigs[b]))
            if jaccard >= threshold:
                near_pairs[pair] = jaccard
                uf.union(a, b)


def _clusters(n: int, uf: _UnionFind, exact_of: dict, near_pairs: dict) -> list[dict]:
    members: dict[int, list[int]] = {}
    touched = set(exact_of) | {d for p in near_pairs for d in p}
    for d in sorted(touched | set(exact_of.values())):
        members.setdefault(uf.find(d), []).append(d)
    best: dict[int, float] = {}
    for (a, b), j in near_pairs.items():
        best[b] = max(best.get(b, 0.0), j)
        best[a] = max(best.get(a, 0.0), j)
    out = []
    for root, docs in sorted(members.items()):
        if len(docs) < 2:
            continue
        kept = min(docs)
        dropped = [d for d in docs if d != kept]
        reasons = {
            d: ("exact duplicate" if d in exact_of else f"near duplicate (Jaccard ~{best.get(d, 0):.2f})")
            for d in dropped
        }
        out.append({"kept": kept, "dropped": dropped, "why": reasons})
    return out


def _write_kept(inputs, output: Path, dropped: set[int]) -> None:
    write_rows_atomic(output, (rec for i, (_, rec) in enumerate(_records(inputs)) if i not in dropped))


def _write_report(report: DedupReport, path: Path) -> None:
    summary = {
        "documents": report.documents,
        "kept": report.kept,
        "exact_dropped": report.exact_dropped,
        "near_dropped": report.near_dropped,
        "clusters": len(report.clusters),
    }
    write_jsonl_atomic(
        path,
        [{"summary": summary}]
        + [
            {"kept": c["kept"], "dropped": c["dropped"], "why": {str(k): v for k, v in c["why"].items()}}
            for c in report.clusters
        ],
    )
