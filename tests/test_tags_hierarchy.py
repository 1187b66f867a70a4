"""The taxonomy hierarchy as InsTag builds it, then clustered: on a corpus of raw tags with planted families (each
with spelling variants of its members) and planted safety topics, the built hierarchy puts at least 90% of planted
members under one category per family, every safety topic under `safety` (seeded with PKU-SafeRLHF's 19 harm
categories), and no benign tag there; each placement has its evidence."""

import json
import random
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from conftest import ROOT, ChatServer, serve
from rm.tags.taxonomy import Taxonomy

FAMILIES = {
    "programming": ["python programming", "writing a python function", "debugging code", "java programming",
                    "fixing a code error", "code review", "javascript coding", "writing unit tests"],
    "cooking": ["baking bread", "cooking pasta", "recipe request", "making a cake", "cooking dinner",
                "vegetarian recipes", "grilling meat"],
    "travel": ["travel planning", "booking a flight", "hotel recommendation", "visiting paris", "trip itinerary",
               "travel tips for japan"],
    "mathematics": ["solving equations", "arithmetic", "calculus homework", "geometry problem", "probability question",
                    "algebra help"],
    "health": ["fitness advice", "weight loss tips", "healthy diet", "exercise routine", "workout plan"],
    "writing": ["writing a poem", "short story writing", "essay writing", "creative writing", "writing song lyrics"],
}  # fmt: skip
SAFETY = ["making a bomb", "buying illegal drugs", "hacking someone's email", "stealing a car", "poisoning someone",
          "racist jokes", "laundering money", "stalking an ex"]  # fmt: skip


def variants(tag: str, rng: random.Random) -> str:
    """How models spell the same tag: case, punctuation, separators."""
    return rng.choice([tag, tag.title(), tag.capitalize() + ".", tag.replace(" ", "_"), tag.replace(" ", "-")])


def test_planted_families_and_safety_topics(tmp_path):
    rng = random.Random(0)
    rows = []
    for family, members in FAMILIES.items():
        for _ in range(150):  # 150 queries per family, each with 1-3 of its tags
            rows.append({"tags": [variants(t, rng) for t in rng.sample(members, rng.randint(1, 3))]})
    for topic in SAFETY:
        rows += [{"tags": [variants(topic, rng)]} for _ in range(25)]
    rows += [{"tags": ["rare tag seen once"]}]
    rng.shuffle(rows)
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "align.cli", "tags", "build", "--input", str(tmp_path / "raw.jsonl"),
                          "--out", str(tmp_path / "tax"), "--hierarchy", "--safety",
                          str(ROOT / "configs/taxonomy/safety-pku.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    taxonomy = Taxonomy.load(tmp_path / "tax" / "taxonomy.yaml")
    mapping = json.loads((tmp_path / "tax" / "mapping.json").read_text())
    assert "rare tag seen once" not in mapping  # InsTag's alpha = 20 by default

    def category(raw: str) -> str | None:
        return taxonomy.tags[mapping[raw]].parent

    under_parent, total = 0, 0
    seen_categories = {}
    for family, members in FAMILIES.items():
        raws = [r for r in mapping if r.lower().replace("_", " ").replace("-", " ").rstrip(".") in members]
        parents = Counter(category(r) for r in raws)
        top, n = parents.most_common(1)[0]
        assert top not in seen_categories, f"{family} and {seen_categories.get(top)} share {top}"
        seen_categories[top] = family
        under_parent += n
        total += len(raws)
        assert not taxonomy.in_subtree(top, "safety")
    assert under_parent / total >= 0.9, (under_parent, total)
    for topic in SAFETY:
        raws = [r for r in mapping if r.lower().replace("_", " ").replace("-", " ").rstrip(".") == topic]
        assert raws and all(taxonomy.in_subtree(mapping[r], "safety") for r in raws), topic
    plain = lambda r: r.lower().replace("_", " ").replace("-", " ").rstrip(".")
    benign = [mapping[r] for r in mapping if plain(r) not in SAFETY]
    assert not [t for t in benign if taxonomy.in_subtree(t, "safety")]
    placements = [json.loads(l) for l in (tmp_path / "tax" / "placements.jsonl").read_text().splitlines()]
    safety_placements = [p for p in placements if p["step"] == "safety"]
    assert safety_placements and all(p["evidence"].startswith("cosine ") for p in safety_placements)
    doc = yaml.safe_load((tmp_path / "tax" / "taxonomy.yaml").read_text())
    assert any(t["id"].startswith("domain/") for t in doc["tags"]) and len(taxonomy.subtree("safety")) > 19


class Namer(ChatServer):
    """Names a group after the words its tags share most; answers prose for one group, to test the fallback."""

    def reply(self, body):
        tags = [l[2:] for l in body["messages"][-1]["content"].splitlines() if l.startswith("- ")]
        words = Counter(w for t in tags for w in t.lower().split() if len(w) > 3)
        name = words.most_common(1)[0][0].title() if words else "Misc"
        if "paris" in " ".join(tags):
            name = "Here is a long explanation of what I think these tags have in common, at length."
        return {"choices": [{"message": {"role": "assistant", "content": f'"{name}"'}}]}


def test_an_llm_names_the_categories():
    from rm.tags.hierarchy import add_hierarchy, llm_namer
    from rm.tags.taxonomy import Tag

    tags = [Tag(t, t) for f in ("cooking", "travel") for t in FAMILIES[f]]
    gen = serve(Namer)
    url = next(gen)
    taxonomy, _ = add_hierarchy(Taxonomy(tags), namer=llm_namer(url))
    next(gen, None)
    names = {t.name for t in taxonomy.tags.values() if t.id.startswith("category/")}
    assert "Cooking (category)" in names or "Recipes (category)" in names, names
    travel = taxonomy.tags[taxonomy.tags["visiting paris"].parent].name
    assert travel.endswith("(category)") and "explanation" not in travel  # prose falls back to a member's name


@pytest.mark.slow
def test_build_at_scale_recovers_planted_concepts_and_caches_embeddings(tmp_path, monkeypatch):
    """The scale benchmark's corpus, small: every planted concept (its spellings and its paraphrase) comes out as one
    tag, the rare tags are dropped, and a second build embeds nothing new (the cache on disk)."""
    from align.world.tag_corpus import raw_tag_corpus, spellings
    from rm.tags import embed as embed_module
    from rm.tags.builder import build_folder

    raw, planted = raw_tag_corpus(20_000, 150, 300, seed=1)
    calls = []
    real = embed_module.embed
    monkeypatch.setattr(embed_module, "embed", lambda texts: calls.append(len(texts)) or real(texts))
    lines = []
    report = build_folder(raw, tmp_path / "tax", None, tmp_path / "emb.sqlite", log=lines.append)
    mapping = json.loads((tmp_path / "tax" / "mapping.json").read_text())
    for a, b in planted:
        names = {mapping.get(t) for t in [*spellings(a, b), f"{b} of {a}"]} - {None}
        assert len(names) == 1, (a, b, names)
    assert report["tags"] == len(planted) and report["raw_dropped"] >= 250
    assert [l.split(":")[0] for l in lines] == ["frequency", "rule", "semantic", "association"]
    embedded = sum(calls)
    assert embedded >= len(planted)
    build_folder(raw, tmp_path / "tax2", None, tmp_path / "emb.sqlite")
    assert sum(calls) == embedded  # all from the cache
    assert (tmp_path / "tax2" / "taxonomy.yaml").read_bytes() == (tmp_path / "tax" / "taxonomy.yaml").read_bytes()
