"""A hierarchy over built tags: domain → category → tag, and a `safety` subtree (`align tags build --hierarchy`).

1. **Safety first**: each tag's MiniLM embedding is compared with every harm category of the safety seed (a
   taxonomy file, e.g. `configs/taxonomy/safety-pku.yaml`: its categories' names and aliases); a tag at least
   `safety_threshold` similar to one is placed under it, with the similarity and the closest seed text as evidence.
2. **Categories**: the other tags are clustered by agglomerative clustering over their embeddings (average linkage,
   cosine distance below `category_distance`); a category is named after its medoid (the member closest to the
   others), or by an LLM given its members when a namer is passed.
3. **Domains**: the categories' centroids are clustered the same way (`domain_distance`), named the same way.

Every placement is recorded (`{"tag", "parent", "step", "evidence"}`) so a reviewer can move it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from rm.tags.taxonomy import Tag, Taxonomy, _key


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "x"


def _clusters(vectors: np.ndarray, distance: float) -> np.ndarray:
    if len(vectors) == 1:
        return np.zeros(1, dtype=int)
    from sklearn.cluster import AgglomerativeClustering

    return AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=distance
    ).fit_predict(vectors)


def _medoid(names: list[str], vectors: np.ndarray) -> str:
    sims = vectors @ vectors.T
    return names[int(sims.sum(1).argmax())]


def llm_namer(url: str, model: str = "default", timeout_s: float = 60.0) -> Callable[[list[str]], str]:
    """Names a group of tags by asking an OpenAI-compatible chat endpoint; falls back to the first member when the
    answer is empty or too long to be a name."""
    import httpx

    def name(members: list[str]) -> str:
        listing = "\n".join(f"- {m}" for m in members[:30])
        body = {"model": model, "temperature": 0.0, "max_tokens": 16, "messages": [
            {"role": "user", "content": "Give a short name (at most four words) for the category that holds these "
                                        f"tags. Answer with the name only.\n{listing}"}]}  # fmt: skip
        try:
            r = httpx.post(url.rstrip("/") + "/chat/completions", json=body, timeout=timeout_s)
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            text = ""
        text = re.sub(r"\s+", " ", (text or "").strip().strip("\"'.*`")).strip()
        return text if 0 < len(text.split()) <= 6 and len(text) <= 60 else members[0]

    return name


def add_hierarchy(
    taxonomy: Taxonomy,
    counts: dict[str, int] | None = None,
    safety: Taxonomy | None = None,
    safety_threshold: float = 0.5,
    category_distance: float = 0.75,
    domain_distance: float = 0.85,
    namer: Callable[[list[str]], str] | None = None,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> tuple[Taxonomy, list[dict]]:
    """A new taxonomy: `taxonomy`'s (flat) tags under categories and domains, safety tags under the seed's
    categories; and the placements with their evidence."""
    if embed is None:
        from rm.tags.embed import embed
    leaves = [t for t in taxonomy.tags.values() if t.parent is None]
    names = [t.id for t in leaves]
    vectors = embed([t.name for t in leaves]) if leaves else np.zeros((0, 384), dtype=np.float32)
    placements: list[dict] = []
    parent: dict[str, str] = {}
    out_tags: list[Tag] = []

    if safety is not None:
        seeds = [(c.id, text) for c in safety.tags.values() if c.parent is not None for text in [c.name, *c.aliases]]
        seed_vectors = embed([text for _, text in seeds])
        sims = vectors @ seed_vectors.T if len(names) else np.zeros((0, len(seeds)))
        for i, name in enumerate(names):
            j = int(sims[i].argmax()) if sims.shape[1] else -1
            if j >= 0 and sims[i, j] >= safety_threshold:
                parent[name] = seeds[j][0]
                placements.append({"tag": name, "parent": seeds[j][0], "step": "safety",
                                   "evidence": f"cosine {sims[i, j]:.2f} with {seeds[j][1]!r}"})  # fmt: skip
        taken = {_key(x) for t in leaves for x in (t.id, t.name, *t.aliases)}  # a built tag keeps its own name
        out_tags += [Tag(c.id, c.name, c.parent, [a for a in c.aliases if _key(a) not in taken])
                     for c in safety.tags.values()]  # fmt: skip

    rest = [i for i, n in enumerate(names) if n not in parent]
    if rest:
        rest_vectors = vectors[rest]
        labels = _clusters(rest_vectors, category_distance)
        categories = []  # (id, member indices into rest)
        for label in sorted(set(labels.tolist())):
            members = [k for k in range(len(rest)) if labels[k] == label]
            member_names = [names[rest[k]] for k in members]
            title = namer(member_names) if namer else _medoid(member_names, rest_vectors[members])
            if any(title == c[1] for c in categories):  # two groups named alike stay apart
                title = f"{title} {label}"
            categories.append((f"category/{_slug(title)}-{label}", title, members))
        centroids = np.stack([rest_vectors[m].mean(0) for _, _, m in categories])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
        domain_labels = _clusters(centroids, domain_distance)
        domain_titles: list[str] = []
        for label in sorted(set(domain_labels.tolist())):
            cats = [c for c, d in zip(categories, domain_labels) if d == label]
            titles = [c[1] for c in cats]
            title = namer(titles) if namer else _medoid(titles, centroids[[categories.index(c) for c in cats]])
            if title in domain_titles:
                title = f"{title} {label}"
            domain_titles.append(title)
            domain_id = f"domain/{_slug(title)}-{label}"
            out_tags.append(Tag(domain_id, f"{title} (domain)"))
            for cat_id, cat_title, members in cats:
                out_tags.append(Tag(cat_id, f"{cat_title} (category)", domain_id))
                for k in members:
                    parent[names[rest[k]]] = cat_id
                    placements.append({"tag": names[rest[k]], "parent": cat_id, "step": "category",
                                       "evidence": f"agglomerative clustering (cosine distance < {category_distance})"})  # fmt: skip
    for t in leaves:
        out_tags.append(Tag(t.id, t.name, parent.get(t.id), list(t.aliases)))
    if counts:
        placements.sort(key=lambda p: -counts.get(p["tag"], 0))
    return Taxonomy(out_tags, "<built hierarchy>"), placements
