"""Generated preference tasks whose preferred response is decided by content, never by length.

The task: translate an English word into Chinese from a fixed dictionary. The preferred response carries the
right translation; the other carries a wrong one. Both are wrapped in filler drawn independently, so length says
nothing about which is preferred. Forum threads for PMP ask the same questions in other words, and the right
answers collect the votes.
"""

from __future__ import annotations

import random

DICTIONARY = {
    "cat": "猫",
    "dog": "狗",
    "water": "水",
    "fire": "火",
    "tree": "树",
    "sun": "太阳",
    "moon": "月亮",
    "book": "书",
    "fish": "鱼",
    "bird": "鸟",
    "horse": "马",
    "rice": "米饭",
    "tea": "茶",
    "mountain": "山",
    "river": "河",
    "flower": "花",
    "rain": "雨",
    "snow": "雪",
    "star": "星星",
    "car": "车",
    "door": "门",
    "hand": "手",
    "heart": "心",
    "sky": "天空",
}
PROMPTS = ["Translate '{w}' into Chinese.", "What is '{w}' in Chinese?", "Chinese for '{w}', please."]
FORUM_QUESTIONS = ["How do you say '{w}' in Chinese?", "Q: the Chinese word for {w}?"]
PREFIXES = ["", "Sure! ", "The answer: ", "In Chinese, ", "Of course, here you go: "]
SUFFIXES = ["", ".", " — hope this helps.", "!", ". Let me know if you need anything else."]


def _response(rng: random.Random, english: str, chinese: str) -> str:
    return f"{rng.choice(PREFIXES)}{english} = {chinese}{rng.choice(SUFFIXES)}"


def translation_comparisons(n: int, seed: int = 0) -> list[dict]:
    """n comparison records (2 responses, ranking [1, 2] or [2, 1]), tagged by the word."""
    rng = random.Random(seed)
    words = sorted(DICTIONARY)
    rows = []
    for i in range(n):
        w = rng.choice(words)
        wrong = DICTIONARY[rng.choice([x for x in words if x != w])]
        good, bad = _response(rng, w, DICTIONARY[w]), _response(rng, w, wrong)
        swap = rng.random() < 0.5
        responses, ranking = ([bad, good], [2, 1]) if swap else ([good, bad], [1, 2])
        rows.append(
            {
                "prompt": [{"role": "user", "content": rng.choice(PROMPTS).format(w=w)}],
                "responses": responses,
                "ranking": ranking,
                "tags": [f"translation/{w}"],
                "source": "translation",
                "annotator": f"sim-{i % 5}",
            }
        )
    return rows


def forum_threads(n: int, seed: int = 0) -> list[dict]:
    """n forum threads with 3 answers each: the right one gets many votes (sometimes accepted), wrong ones few
    or negative."""
    rng = random.Random(seed + 1)
    words = sorted(DICTIONARY)
    rows = []
    for _ in range(n):
        w = rng.choice(words)
        wrong = rng.sample([x for x in words if x != w], 2)
        answers = [
            {"text": _response(rng, w, DICTIONARY[w]), "upvotes": rng.randint(8, 40), "accepted": rng.random() < 0.5}
        ]
        answers += [
            {"text": _response(rng, w, DICTIONARY[x]), "upvotes": rng.randint(-3, 2), "accepted": False} for x in wrong
        ]
        rng.shuffle(answers)
        rows.append(
            {"question": rng.choice(FORUM_QUESTIONS).format(w=w), "answers": answers, "tags": [f"translation/{w}"]}
        )
    return rows
