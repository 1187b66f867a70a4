"""A generated bilingual (English and Chinese) pretraining corpus about the world's facts: translations,
arithmetic and unit conversions. Deterministic for a seed."""

from __future__ import annotations

import random

from align.world.preferences import DICTIONARY

EN_TEMPLATES = [
    "The Chinese word for {en} is {zh}.",
    "In Chinese, {en} is written {zh}.",
    "{a} plus {b} equals {s}.",
    "{a} + {b} = {s}.",
    "{km} km is {m} m.",
    "If you add {a} and {b} you get {s}.",
    "A {en} is a common thing to see.",
    "We talked about the {en} for a long time.",
]
ZH_TEMPLATES = [
    "{zh}的英文是{en}。",
    "{a}加{b}等于{s}。",
    "{km}公里等于{m}米。",
    "我们今天看到了{zh}。",
    "这是一个关于{zh}的故事。",
    "{zh}，英语叫做{en}。",
]


def _sentence(rng: random.Random, templates: list[str]) -> str:
    en = rng.choice(sorted(DICTIONARY))
    a, b, km = rng.randint(0, 99), rng.randint(0, 99), rng.randint(1, 20)
    return rng.choice(templates).format(en=en, zh=DICTIONARY[en], a=a, b=b, s=a + b, km=km, m=km * 1000)


def documents(n: int, seed: int = 0, sentences: tuple[int, int] = (3, 8)) -> list[dict]:
    """n documents `{"id", "text", "lang"}`, about half English, half Chinese."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lang = "zh" if rng.random() < 0.5 else "en"
        templates = ZH_TEMPLATES if lang == "zh" else EN_TEMPLATES
        joiner = "" if lang == "zh" else " "
        text = joiner.join(_sentence(rng, templates) for _ in range(rng.randint(*sentences)))
        docs.append({"id": f"doc-{seed}-{i}", "text": text, "lang": lang})
    return docs
