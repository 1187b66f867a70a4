"""Learned document filters: `align data train-classifier` and `align data filter --classifier`.

A fast linear classifier (scikit-learn: logistic loss by SGD, balanced classes) over hashed features — word 1–2-grams
and character 2–4-grams within words, so text without spaces (Chinese, code) has features too — trained on
examples of what to keep (`--positive`, e.g. reference-quality pages) and what to drop (`--negative`). The same tool
makes the quality filter (keep documents scoring at least `--min-score`) and the offensive-content filter (train
with offensive text as positive, keep documents scoring at most `--max-score`).

Training holds out a share of both classes and reports precision, recall, F1 and ROC AUC on it, and precision and
recall at a range of thresholds, so the threshold is chosen from measured figures. The model is saved with joblib
(a pickle: load only classifiers you trained) beside a JSON card with those figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from align.core.records import DataError, iter_documents
from base_model.atomic import atomic_path, write_json_atomic

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _features():
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.pipeline import FeatureUnion

    common = {"alternate_sign": False, "n_features": 2**20, "lowercase": True}
    return FeatureUnion(
        [
            ("words", HashingVectorizer(analyzer="word", ngram_range=(1, 2), **common)),
            ("chars", HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), **common)),
        ]
    )


def _texts(paths, text_field: str) -> list[str]:
    return [text for _, _, text in iter_documents(paths, text_field)]


def train_classifier(
    positive: list[str | Path],
    negative: list[str | Path],
    out: str | Path,
    text_field: str = "text",
    heldout: float = 0.2,
    seed: int = 0,
    epochs: int = 20,
) -> dict:
    """Train, measure on the held-out share, then refit on everything and save `out` (joblib) and `out.json`."""
    import joblib
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    pos, neg = _texts(positive, text_field), _texts(negative, text_field)
    if len(pos) < 5 or len(neg) < 5:
        raise DataError(f"need at least 5 documents of each class, got {len(pos)} positive and {len(neg)} negative")
    texts = pos + neg
    labels = np.array([1] * len(pos) + [0] * len(neg))

    def model():
        clf = SGDClassifier(
            loss="log_loss", alpha=1e-5, max_iter=epochs, tol=None, class_weight="balanced", random_state=seed
        )
        return make_pipeline(_features(), clf)

    x_tr, x_te, y_tr, y_te = train_test_split(texts, labels, test_size=heldout, random_state=seed, stratify=labels)
    fitted = model().fit(x_tr, y_tr)
    p = fitted.predict_proba(x_te)[:, 1]
    prec, rec, f1, _ = precision_recall_fscore_support(y_te, p >= 0.5, average="binary", zero_division=0)
    curve = []
    for t in THRESHOLDS:
        tp, tr, _, _ = precision_recall_fscore_support(y_te, p >= t, average="binary", zero_division=0)
        curve.append({"threshold": t, "precision": float(tp), "recall": float(tr)})
    card = {
        "positive": [str(x) for x in positive],
        "negative": [str(x) for x in negative],
        "documents": {"positive": len(pos), "negative": len(neg)},
        "heldout": {
            "share": heldout,
            "documents": len(y_te),
            "precision": float(prec),
            "recall": float(rec),
            "f1": float(f1),
            "roc_auc": float(roc_auc_score(y_te, p)),
            "at_thresholds": curve,
        },  # fmt: skip
        "text_field": text_field,
        "features": "hashed word 1-2-grams + char_wb 2-4-grams (2^20 each); SGD logistic regression, balanced",
    }
    final = model().fit(texts, labels)  # the saved model has seen every example
    out = Path(out)
    with atomic_path(out) as tmp:
        joblib.dump({"pipeline": final, "card": card}, tmp)
    write_json_atomic(out.with_name(out.name + ".json"), card)
    return card


class TextClassifier:
    """A saved classifier: `score(texts)` gives the probability of the positive class."""

    def __init__(self, path: str | Path) -> None:
        import joblib

        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: classifier not found (train one with `align data train-classifier`)")
        saved = joblib.load(path)
        if not isinstance(saved, dict) or "pipeline" not in saved:
            raise DataError(f"{path}: not a classifier written by `align data train-classifier`")
        self.pipeline, self.card = saved["pipeline"], saved["card"]

    def score(self, texts: list[str]) -> np.ndarray:
        return self.pipeline.predict_proba(texts)[:, 1]


def classify_documents(
    inputs: list[str | Path],
    output: str | Path,
    classifier: str | Path,
    min_score: float | None = None,
    max_score: float | None = None,
    text_field: str = "text",
    rejected: str | Path | None = None,
    batch: int = 1024,
) -> dict:
    """Keep documents whose score is within [min_score, max_score]; each written with `classifier_score`."""
    if min_score is None and max_score is None:
        raise DataError("give --min-score (keep what scores at least X) or --max-score (keep at most X)")
    clf = TextClassifier(classifier)
    counts = {"kept": 0, "below_min_score": 0, "above_max_score": 0}
    from contextlib import ExitStack

    with ExitStack() as stack:
        targets = [output] + ([rejected] if rejected is not None else [])
        files = [stack.enter_context(stack.enter_context(atomic_path(t)).open("w", encoding="utf-8")) for t in targets]
        pending: list[tuple[dict, str]] = []

        def flush() -> None:
            scores = clf.score([t for _, t in pending])
            for (record, _), s in zip(pending, scores):
                reason = (
                    "below_min_score"
                    if min_score is not None and s < min_score
                    else "above_max_score"
                    if max_score is not None and s > max_score
                    else None
                )
                counts[reason or "kept"] += 1
                if reason is None or len(files) > 1:
                    row = {**record, "classifier_score": float(s), **({"dropped_by": reason} if reason else {})}
                    files[0 if reason is None else 1].write(json.dumps(row, ensure_ascii=False) + "\n")
            pending.clear()

        for _, record, text in iter_documents(inputs, text_field):
            pending.append((record, text))
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
    return counts
