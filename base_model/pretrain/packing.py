"""Packed pretraining data: fixed-length rows of token ids in a memory-mapped file, read deterministically.

Layout of a packed folder:

    tokens.bin     uint32, n_rows x seq_len, row-major (documents end with <|endoftext|>; long ones continue in
                   the next row)
    index.json     {"seq_len", "n_rows", "n_docs", "n_tokens", "eod_id", "dtype", "tokenizer", "sources"}

Positions restart after every <|endoftext|> (and at the start of every row), so attention stays inside a
document. Pretraining, continued pretraining and PPO's pretraining-gradient mixing all read this format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from align.core.losses import IGNORE_INDEX
from align.core.records import DataError, iter_documents, iter_records
from base_model.atomic import atomic_folder, write_json_atomic

INDEX, TOKENS = "index.json", "tokens.bin"


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:  # a row holds at least one token and the one it predicts
        raise DataError(f"seq_len must be at least 2, got {seq_len}")


def pack(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer,
    seq_len: int,
    text_field: str = "text",
    tokenizer_name: str = "",
) -> dict:
    """Tokenise documents, append <|endoftext|> to each, and fill rows of seq_len tokens. The last partial row is
    padded with <|endoftext|>. Written to a temporary folder and renamed into place."""
    _check_seq_len(seq_len)
    out_dir = Path(out_dir)
    eod = tokenizer.eod_id
    n_docs = n_tokens = n_rows = 0
    with atomic_folder(out_dir) as tmp:  # a whole folder, or none
        with (tmp / TOKENS).open("wb") as f:
            buffer: list[int] = []
            for _, _, text in iter_documents(inputs, text_field):
                ids = tokenizer.encode(text) + [eod]
                n_docs += 1
                n_tokens += len(ids)
                buffer.extend(ids)
                while len(buffer) >= seq_len:
                    np.asarray(buffer[:seq_len], dtype=np.uint32).tofile(f)
                    del buffer[:seq_len]
                    n_rows += 1
            if buffer:
                np.asarray(buffer + [eod] * (seq_len - len(buffer)), dtype=np.uint32).tofile(f)
                n_rows += 1
        if n_docs == 0:
            raise DataError(f"{', '.join(map(str, inputs))}: no documents")
        index = _index(seq_len, n_rows, n_docs, n_tokens, eod, tokenizer_name, inputs)
        write_json_atomic(tmp / INDEX, index)
    return index


def _index(seq_len, n_rows, n_docs, n_tokens, eod, tokenizer_name, inputs) -> dict:
    return {"seq_len": seq_len, "n_rows": n_rows, "n_docs": n_docs, "n_tokens": n_tokens, "eod_id": eod,
            "dtype": "uint32", "tokenizer": tokenizer_name, "sources": [str(p) for p in inputs]}  # fmt: skip


def positions_and_labels(row: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions restarting after each <|endoftext|>; labels = tokens, except -100 on each document's first
    token (it is never predicted from the previous document) and on the padding after the last document."""
    starts = np.zeros(len(row), dtype=bool)
    starts[0] = True
    starts[1:] = row[:-1] == eod_id
    doc = np.cumsum(starts) - 1
    first_index = np.flatnonzero(starts)
    positions = np.arange(len(row)) - first_index[doc]
    labels = row.astype(np.int64)
    labels[starts] = IGNORE_INDEX  # also covers the padding: each <|endoftext|> after another starts a "document"
    return positions, labels


class PackedDataset:
    """Rows of a packed folder. `row(i)` gives tensors ready for the model; `order(epoch, seed)` a permutation."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / INDEX).exists():
            raise DataError(f"{path}: not a packed dataset (no {INDEX}); create one with `align data pack`")
        self.index = json.loads((path / INDEX).read_text())
        self.seq_len, self.n_rows, self.eod_id = self.index["seq_len"], self.index["n_rows"], self.index["eod_id"]
        size = (path / TOKENS).stat().st_size
        if size != self.n_rows * self.seq_len * 4:
            raise DataError(f"{path / TOKENS}: {size} bytes, expected {self.n_rows * self.seq_len * 4} from {INDEX}")
        self.tokens = np.memmap(path / TOKENS, dtype=np.uint32, mode="r", shape=(self.n_rows, self.seq_len))

    def __len__(self) -> int:
        return self.n_rows

    def row(self, i: int) -> dict[str, torch.Tensor]:
        tokens = np.asarray(self.tokens[i])
        positions, labels = positions_and_labels(tokens, self.eod_id)
        return {
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "position_ids": torch.from_numpy(positions),
            "labels": torch.from_numpy(labels),
        }

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.row(i) for i in indices]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def split_rows(n_rows: int, eval_rows: int, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return sorted(order[eval_rows:]), sorted(order[:eval_rows])


def _document_ids(record: dict, where: str, tokenizer, text_field: str) -> list[int]:
    """A document's ids: its text field, or (instruction data) its `messages` rendered as ChatML."""
    text = record.get(text_field)
    if isinstance(text, str):
        return tokenizer.encode(text)
    if isinstance(record.get("messages"), list):
        from align.core.chatml import render
        from align.core.records import as_messages

        return render(as_messages(record["messages"], where, "messages"), tokenizer)
    raise DataError(f"{where}: field '{text_field}' (or 'messages') is missing or not a string")


def pack_mix(
    sources: list[tuple[str | Path, float]],
    out_dir: str | Path,
    tokenizer,
    seq_len: int,
    text_field: str = "text",
    tokenizer_name: str = "",
    total_tokens: int | None = None,
    decontaminate_against: list[str | Path] | None = None,
    ngram: int = 13,
    seed: int = 0,
    progress=None,
) -> dict:
    """Pack several sources so that each makes up its weight's share of the tokens (e.g. code 0.9, instruction data
    0.1). `total_tokens` (default: as many as the sources give without repeating any) sets the size; a source
    smaller than its share is repeated, in a new shuffled order each pass, and the index says how many passes each
    took. Documents are interleaved by deficit (the source furthest below its share comes next), so every prefix
    of the output keeps the proportions to within one document. With `decontaminate_against`, documents sharing an
    `ngram`-gram with an evaluation item are dropped first (counted per source)."""
    from base_model.pretrain.decontam import build_index, ngram_keys

    _check_seq_len(seq_len)
    if not sources:
        raise DataError("--mix: no sources")
    weights = np.array([float(w) for _, w in sources])
    if (weights <= 0).any():
        raise DataError(f"--mix: weights must be positive, got {[w for _, w in sources]}")
    weights = weights / weights.sum()
    index_keys = build_index(decontaminate_against, ngram) if decontaminate_against else None
    eod = tokenizer.eod_id
    docs: list[list[np.ndarray]] = []
    stats = []
    for path, _ in sources:
        kept, dropped = [], 0
        for where, record in iter_records(path):
            text = record.get(text_field) if isinstance(record.get(text_field), str) else None
            if index_keys is not None:
                check = (
                    text
                    if text is not None
                    else " ".join(str(m.get("content", "")) for m in record.get("messages") or [])
                )
                if any(k in index_keys for k in ngram_keys(check, ngram)):
                    dropped += 1
                    continue
            kept.append(np.asarray(_document_ids(record, where, tokenizer, text_field) + [eod], dtype=np.uint32))
            if progress:
                progress(1)
        if not kept:
            raise DataError(f"{path}: no documents left" + (f" ({dropped} contaminated)" if dropped else ""))
        docs.append(kept)
        stats.append({"source": str(path), "documents": len(kept), "tokens": int(sum(len(d) for d in kept)),
                      "contaminated_dropped": dropped})  # fmt: skip
    available = np.array([s["tokens"] for s in stats], dtype=np.float64)
    total = int(total_tokens) if total_tokens else int((available / weights).min())
    targets = weights * total
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(d)) for d in docs]
    cursor = [0] * len(docs)
    passes = [1] * len(docs)
    taken = np.zeros(len(docs))
    out_dir = Path(out_dir)
    n_docs = n_tokens = n_rows = 0
    with atomic_folder(out_dir) as tmp:
        with (tmp / TOKENS).open("wb") as f:
            buffer: list[np.ndarray] = []
            buffered = 0
            while True:
                deficit = targets - taken
                i = int(np.argmax(deficit / weights))
                if deficit[i] <= 0:
                    break
                if cursor[i] == len(docs[i]):  # this source is used up: another pass in a new order
                    orders[i], cursor[i] = rng.permutation(len(docs[i])), 0
                    passes[i] += 1
                doc = docs[i][orders[i][cursor[i]]]
                cursor[i] += 1
                taken[i] += len(doc)
                n_docs += 1
                n_tokens += len(doc)
                buffer.append(doc)
                buffered += len(doc)
                if buffered >= seq_len:
                    flat = np.concatenate(buffer)
                    full = len(flat) // seq_len
                    flat[: full * seq_len].tofile(f)
                    n_rows += full
                    buffer, buffered = [flat[full * seq_len :]], len(flat) - full * seq_len
            if buffered:
                flat = np.concatenate(buffer)
                np.concatenate([flat, np.full(seq_len - len(flat), eod, dtype=np.uint32)]).tofile(f)
                n_rows += 1
        for s, t, w, p in zip(stats, taken, weights, passes):
            s.update(weight=float(w), tokens_packed=int(t), share=float(t / max(n_tokens, 1)), passes=p)
        index = _index(seq_len, n_rows, n_docs, n_tokens, eod, tokenizer_name, [p for p, _ in sources])
        index.update(mix=stats, decontaminated_against=[str(p) for p in decontaminate_against or []])
        write_json_atomic(tmp / INDEX, index)
    return index
