"""A PPO task for the toy world: the reward model prefers enthusiastic answers (ending in "!"), a property the SFT
data shows only 1 time in 10. Pairs differ only in that final character, so length cannot explain a preference.
"""

from __future__ import annotations

import random

from align.world.preferences import DICTIONARY

QUESTIONS = [
    "Translate '{w}' into Chinese.",
    "What is '{w}' in Chinese?",
    "What is {a}+{b}?",
    "How many metres are {km} km?",
]


def _qa(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(sorted(DICTIONARY))
    a, b, km = rng.randint(0, 20), rng.randint(0, 20), rng.randint(1, 9)
    q = rng.choice(QUESTIONS)
    answer = {
        QUESTIONS[0]: f"{w} = {DICTIONARY[w]}",
        QUESTIONS[1]: f"{w} = {DICTIONARY[w]}",
        QUESTIONS[2]: f"{a}+{b} = {a + b}",
        QUESTIONS[3]: f"{km} km = {km * 1000} m",
    }[q]
    return q.format(w=w, a=a, b=b, km=km), answer


def sft_conversations(n: int, seed: int = 0, enthusiastic: float = 0.1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = _qa(rng)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a + ("!" if rng.random() < enthusiastic else ".")},
                ]
            }
        )
    return rows


def enthusiasm_comparisons(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(n):
        q, a = _qa(rng)
        if rng.random() < 0.3:  # a wrong answer too, so the reward model sees varied text
            a = a[:-1] + str(rng.randint(0, 9))
        good, bad = a + "!", a + "."
        swap = rng.random() < 0.5
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "responses": [bad, good] if swap else [good, bad],
                "ranking": [2, 1] if swap else [1, 2],
                "tags": ["style/enthusiasm"],
                "source": "enthusiasm",
            }
        )
    return rows


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 2)
    return [{"prompt": [{"role": "user", "content": _qa(rng)[0]}]} for _ in range(n)]
