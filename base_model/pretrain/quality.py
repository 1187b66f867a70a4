"""Quality filtering: `align data filter`.

Rule filters in the style of Gopher (Rae et al. 2021) — length, mean word length, symbol and digit ratios,
bullet and ellipsis lines, alphabetic words, stop words, line/paragraph/n-gram repetition, banned words — and a
model-based score: perplexity under a small reference language model. Every document gets its scores and the
first rule that dropped it, so a reviewer can see why.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import torch

from align.core.config import Section
from align.core.records import DataError, iter_documents
from base_model.atomic import atomic_path
from base_model.pretrain.dedup import is_cjk

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
_WORD = re.compile(r"\S+")


class QualityRules(Section):
    min_words: int = 50  # CJK text: characters / 2 count as words
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1  # '#' and '...' per word
    max_digit_ratio: float = 0.3  # digits per non-space character
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2  # English only
    max_duplicate_lines: float = 0.3
    max_duplicate_paragraphs: float = 0.3
    max_top_ngram_chars: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    max_duplicate_ngram_chars: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    banned_words: list[str] = []
    max_perplexity: float | None = None  # needs a reference model


def _ngram_char_fractions(words: list[str], n: int) -> tuple[float, float]:
    """(chars in the most frequent n-gram / all chars, chars in duplicated n-grams / all chars)."""
    total = sum(len(w) for w in words) or 1
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0, 0.0
    counts = Counter(grams)
    top, top_count = counts.most_common(1)[0]
    top_frac = sum(len(w) for w in top) * top_count / total if top_count > 1 else 0.0
    dup = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                dup[j] = True
    return top_frac, sum(len(w) for w, d in zip(words, dup) if d) / total


def rule_scores(text: str, rules: QualityRules) -> dict[str, float]:
    cjk = is_cjk(text)
    words = _WORD.findall(text)
    chars = [c for c in text if not c.isspace()]
    n_words = len(chars) / 2 if cjk else len(words)
    lines = [l for l in text.splitlines() if l.strip()]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    s = {
        "words": float(n_words),
        "mean_word_length": (sum(len(w) for w in words) / len(words)) if words and not cjk else 0.0,
        "symbol_ratio": (text.count("#") + text.count("...") + text.count("…")) / max(n_words, 1),
        "digit_ratio": sum(c.isdigit() for c in chars) / max(len(chars), 1),
        "bullet_lines": sum(l.lstrip().startswith(("•", "-", "*", "·")) for l in lines) / max(len(lines), 1),
        "ellipsis_lines": sum(l.rstrip().endswith(("...", "…")) for l in lines) / max(len(lines), 1),
        "alpha_words": sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1),
        "stop_words": float(sum(1 for w in words if w.lower().strip(".,!?;:") in STOP_WORDS)),
        "duplicate_lines": 1 - len(set(lines)) / max(len(lines), 1),
        "duplicate_paragraphs": 1 - len(set(paragraphs)) / max(len(paragraphs), 1),
    }
    units = chars if cjk else [w.lower() for w in words]
    for n in rules.max_top_ngram_chars:
        s[f"top_{n}gram_chars"] = _ngram_char_fractions(units, n)[0]
    for n in rules.max_duplicate_ngram_chars:
        s[f"duplicate_{n}gram_chars"] = _ngram_char_fractions(units, n)[1]
    lowered = text.lower()
    s["banned_words"] = float(sum(lowered.count(w.lower()) for w in rules.banned_words))
    s["cjk"] = float(cjk)
    return s


def first_failure(s: dict[str, float], rules: QualityRules) -> str | None:
    cjk = bool(s["cjk"])
    checks = [
        ("too_short", s["words"] < rules.min_words),
        ("too_long", s["words"] > rules.max_words),
        (
            "mean_word_length",
            not cjk and not rules.min_mean_word_length <= s["mean_word_length"] <= rules.max_mean_word_length,
        ),
        ("symbol_ratio", s["symbol_ratio"] > rules.max_symbol_ratio),
        ("digit_ratio", s["digit_ratio"] > rules.max_digit_ratio),
        ("bullet_lines", s["bullet_lines"] > rules.max_bullet_lines),
        ("ellipsis_lines", s["ellipsis_lines"] > rules.max_ellipsis_lines),
        ("alpha_words", not cjk and s["alpha_words"] < rules.min_alpha_words),
        ("stop_words", not cjk and s["stop_words"] < rules.min_stop_words),
        ("duplicate_lines", s["duplicate_lines"] > rules.max_duplicate_lines),
        ("duplicate_paragraphs", s["duplicate_paragraphs"] > rules.max_duplicate_paragraphs),
        ("banned_words", s["banned_words"] > 0),
    ]
    checks += [
        (f"top_{n}gram_chars", s[f"top_{n}gram_chars"] > limit) for n, limit in rules.max_top_ngram_chars.items()
    ]
    checks += [
        (f"duplicate_{n}gram_chars", s[f"duplicate_{n}gram_chars"] > limit)
        for n, limit in rules.max_duplicate_ngram_chars.items()
    ]
    if rules.max_perplexity is not None and "perplexity" in s:
        checks.append(("perplexity", s["perplexity"] > rules.max_perplexity))
    return next((name for name, failed in checks if failed), None)


@torch.no_grad()
def perplexities(model, tokenizer, texts: list[str], max_tokens: int = 1024, batch_size: int = 8) -> list[float]:
    """Each text's perplexity under a reference model: exp(mean negative log-likelihood) of its first max_tokens
    tokens (inf under 2 tokens), `batch_size` texts per forward pass on the model's device.

    Rows are padded on the right: under causal attention no token sees the padding after it. Texts longer than the
    model's trained length go alone (their rotary scaling depends on their own length), so each score equals the
    one-text score."""
    ids = [tokenizer.encode(t)[:max_tokens] for t in texts]
    out = [float("inf")] * len(texts)
    scored = sorted((i for i in range(len(ids)) if len(ids[i]) >= 2), key=lambda i: len(ids[i]))
    limit = model.config.seq_length
    batches = [[i] for i in scored if len(ids[i]) > limit]
    short = [i for i in scored if len(ids[i]) <= limit]
    batches += [short[k : k + batch_size] for k in range(0, len(short), batch_size)]
    for batch in batches:
        width = max(len(ids[i]) for i in batch)
        x = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            x[row, : len(ids[i])] = torch.tensor(ids[i])
        x = x.to(model.device)
        logprobs = model(x, token_logprobs=True).token_logprobs  # (B, L-1), without (B, L, V) logits
        means = [logprobs[row, : len(ids[i]) - 1].mean() for row, i in enumerate(batch)]
        for i, mean in zip(batch, torch.stack(means).tolist()):
            out[i] = math.exp(-mean)
    return out


def filter_documents(
    inputs: list[str | Path],
    output: str | Path,
    rules: QualityRules,
    text_field: str = "text",
    model_dir: str | Path | None = None,
    rejected: str | Path | None = None,
    progress=None,
    chunk: int = 64,
) -> dict:
    """Write kept documents to `output` (each with a `quality` field) and, optionally, dropped ones to `rejected`.
    The reference model (`model_dir`) runs on the GPU in bf16 when there is one, over `chunk` documents at a time;
    `progress(n)` is told how many documents each chunk held."""
    model = tokenizer = None
    if model_dir is not None:
        from align.core.distributed import device as training_device
        from base_model import QwenTokenizer, load_pretrained

        device = training_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tokenizer = load_pretrained(model_dir, dtype, device).eval(), QwenTokenizer.from_file(model_dir)
    elif rules.max_perplexity is not None:
        raise DataError("max_perplexity is set but no reference model was given (--model DIR)")
    counts: Counter = Counter()
    with ExitStack() as stack:  # files close, then both are renamed into place, only when every document was read
        targets = [output] + ([rejected] if rejected is not None else [])
        files = [stack.enter_context(stack.enter_context(atomic_path(t)).open("w", encoding="utf-8")) for t in targets]
        pending: list[tuple[dict, str]] = []

        def flush() -> None:
            texts = [text for _, text in pending]
            ppl = perplexities(model, tokenizer, texts) if model is not None else None
            for k, (record, text) in enumerate(pending):
                scores = rule_scores(text, rules)
                if ppl is not None:
                    scores["perplexity"] = ppl[k]
                reason = first_failure(scores, rules)
                counts[reason or "kept"] += 1
                row = {**record, "quality": {"scores": scores, "dropped_by": reason}}
                if reason is None or len(files) > 1:
                    files[0 if reason is None else 1].write(json.dumps(row, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(len(pending))
            pending.clear()

        for _, record, text in iter_documents(inputs, text_field):
            pending.append((record, text))
            if len(pending) == chunk:
                flush()
        flush()
    return dict(counts)
