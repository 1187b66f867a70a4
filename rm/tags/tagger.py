"""Tagging prompts onto a taxonomy: `align tags assign`.

- `data`: tags already in the rows, mapped onto the taxonomy through ids, names and aliases;
- `embedding`: nearest tags by MiniLM cosine similarity (top-k above a threshold);
- `llm`: an InsTag-style prompt to any OpenAI-compatible chat endpoint (a vLLM server, say); the JSON answer is
  validated and each tag mapped onto the taxonomy (by name or alias, else by nearest embedding).
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from typing import Literal

import numpy as np

from align.core.records import DataError
from rm.tags.taxonomy import Taxonomy

Method = Literal["data", "embedding", "llm"]

INSTAG_PROMPT = (
    "You are a helpful assistant. Please identify tags of user intentions in the following user query and provide "
    "an explanation for each tag. Please respond in the JSON format "
    '[{"tag": str, "explanation": str}].'
)


def prompt_text(row: dict) -> str:
    p = row.get("prompt", row.get("messages", row.get("text", row.get("instruction"))))
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        return "\n".join(m.get("content", "") for m in p if isinstance(m, dict) and m.get("role") in ("user", "system"))
    raise DataError("row has no 'prompt', 'messages', 'text' or 'instruction' field to tag")


def map_data_tags(
    rows: list[tuple[str, dict]], taxonomy: Taxonomy, on_unknown: Literal["error", "drop"] = "error"
) -> tuple[list[list[str]], Counter]:
    unknown: Counter = Counter()
    out = []
    for where, row in rows:
        tags = row.get("tags")
        if not isinstance(tags, list):
            raise DataError(f"{where}: field 'tags' must be a list")
        mapped = []
        for t in tags:
            tag_id = taxonomy.resolve(str(t))
            if tag_id is None:
                if on_unknown == "error":
                    raise DataError(f"{where}: tag {t!r} is not in the taxonomy {taxonomy.source}")
                unknown[str(t)] += 1
            elif tag_id not in mapped:
                mapped.append(tag_id)
        out.append(mapped)
    return out, unknown


class EmbeddingTagger:
    def __init__(self, taxonomy: Taxonomy) -> None:
        from rm.tags.embed import embed

        self.ids, texts = [], []
        for t in taxonomy.tags.values():
            for name in {t.name, t.id.rsplit("/", 1)[-1], *t.aliases}:
                self.ids.append(t.id)
                texts.append(name.replace("_", " "))
        self.vectors = embed(texts)

    def nearest(self, texts: list[str], threshold: float, top_k: int) -> list[list[tuple[str, float]]]:
        from rm.tags.embed import embed

        sims = embed(texts) @ self.vectors.T  # (N, names)
        out = []
        for row in sims:
            best: dict[str, float] = {}
            for j in np.argsort(-row):
                if row[j] < threshold or len(best) == top_k:
                    break
                best.setdefault(self.ids[j], float(row[j]))
            out.append(list(best.items()))
        return out


def llm_tags(text: str, endpoint: str, model: str, timeout: float = 60.0) -> list[str]:
    """Ask an OpenAI-compatible endpoint for InsTag tags; returns the raw tag strings."""
    body = json.dumps(
        {
            "model": model,
            "temperature": 0.0,
            "messages": [{"role": "system", "content": INSTAG_PROMPT}, {"role": "user", "content": text}],
        }
    ).encode()
    request = urllib.request.Request(
        endpoint.rstrip("/") + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
    start, end = answer.find("["), answer.rfind("]")
    try:
        items = json.loads(answer[start : end + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("tag"), str) for i in items):
        raise DataError(f"the model's answer is not a JSON list of {{'tag', 'explanation'}}: {answer[:200]!r}")
    return [i["tag"] for i in items]


def assign(
    rows: list[tuple[str, dict]],
    taxonomy: Taxonomy,
    method: Method = "data",
    threshold: float = 0.35,
    top_k: int = 3,
    endpoint: str | None = None,
    model: str = "default",
    on_unknown: Literal["error", "drop"] = "error",
) -> tuple[list[dict], dict]:
    """Rows with a `tags` list of taxonomy ids, and a report."""
    report: dict = {"method": method, "rows": len(rows)}
    if method == "data":
        tags, unknown = map_data_tags(rows, taxonomy, on_unknown)
        report["unknown_tags"] = dict(unknown)
    elif method == "embedding":
        texts = []
        for where, row in rows:
            try:
                texts.append(prompt_text(row))
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        nearest = EmbeddingTagger(taxonomy).nearest(texts, threshold, top_k)
        tags = [[t for t, _ in n] for n in nearest]
    else:
        if endpoint is None:
            raise DataError("--method llm needs --endpoint (an OpenAI-compatible base URL, e.g. http://host:8000/v1)")
        tagger, tags, unmapped = None, [], Counter()
        for where, row in rows:
            mapped = []
            for raw in llm_tags(prompt_text(row), endpoint, model):
                tag_id = taxonomy.resolve(raw)
                if tag_id is None:
                    tagger = tagger or EmbeddingTagger(taxonomy)
                    near = tagger.nearest([raw], threshold, 1)[0]
                    tag_id = near[0][0] if near else None
                if tag_id is None:
                    unmapped[raw] += 1
                elif tag_id not in mapped:
                    mapped.append(tag_id)
            tags.append(mapped)
        report["unmapped_tags"] = dict(unmapped)
    report["untagged_rows"] = sum(1 for t in tags if not t)
    return [{**row, "tags": t} for (_, row), t in zip(rows, tags)], report
