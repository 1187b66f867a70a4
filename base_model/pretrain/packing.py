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
from align.core.records import DataError, iter_documents
from base_model.atomic import atomic_folder, write_json_atomic

INDEX, TOKENS = "index.json", "tokens.bin"


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
        index = {
            "seq_len": seq_len,
            "n_rows": n_rows,
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "eod_id": eod,
            "dtype": "uint32",
            "tokenizer": tokenizer_name,
            "sources": [str(p) for p in inputs],
        }
        write_json_atomic(tmp / INDEX, index)
    return index


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
