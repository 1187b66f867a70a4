"""Open-set tagging, InsTag's first step: `align tags raw --input prompts.jsonl --out raw_tags.jsonl`.

Each prompt goes to a model with InsTag's tagging prompt (the paper's words: identify the tags of the user's
intentions, with an explanation for each, as JSON). Answers are read leniently — a JSON list, objects one per line,
a `{"tags": [...]}` wrapper, a Markdown fence, single quotes, trailing commas, text around the JSON, an answer cut
off mid-list (the complete objects are kept) — and validated strictly: every kept item has a non-empty `tag`
string. An answer with no valid tag is asked again (`retries` times, sampled); one that never gives any is a
failure, recorded with the model's last answer. Tags are normalised as InsTag normalises them before building
(lower case, spaces, no surrounding punctuation).

Models: any OpenAI-compatible chat endpoint (`--endpoint`, several requests in flight) or a checkpoint (`--model`,
batched with our sampler). Without a model, `--offline` proposes tags from each prompt's keyphrases (TF-IDF over the
input's word 1–3-grams, scikit-learn), so the workflow runs end to end with no model at all.

Rows are appended as they are tagged (`{"index", "prompt", "tags", "explanations", "status", "attempts"}`), so a
stopped run resumes; `OUT.report.json` counts the tagged, retried and failed prompts and lists the failures.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from align.core.records import DataError, iter_records, read_appended_rows
from base_model.atomic import write_json_atomic
from rm.tags.tagger import prompt_text

TAG_PROMPT = (
    "Please identify tags of user intentions in the following user query and provide an explanation for each tag. "
    'Please respond in the JSON format {{"tag": str, "explanation": str}}.\nQuery: {query}'
)
SYSTEM = "You are a helpful assistant."

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|\Z)", re.S)
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)


def normalise_tag(tag: str) -> str:
    tag = re.sub(r"\s+", " ", tag.replace("_", " ")).strip().strip(".,;:!?\"'`*-").strip().lower()
    return tag


def _load(text: str):
    for attempt in (text, re.sub(r",\s*([\]}])", r"\1", text)):
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            pass
        try:
            return ast.literal_eval(attempt)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return None


def parse_tag_answer(answer: str) -> list[dict]:
    """`[{"tag", "explanation"}]` from a model's answer, as leniently as the answer needs; [] when it has none."""
    text = answer.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    data = None
    start, end = text.find("["), text.rfind("]")
    if start != -1 and end > start:
        data = _load(text[start : end + 1])
    if data is None and text.startswith("{"):
        data = _load(text)
    if isinstance(data, dict):
        data = data.get("tags", [data])
    if not isinstance(data, list):  # objects one by one (one per line, or a list cut off before its end)
        data = [x for x in (_load(m.group()) for m in _OBJECT.finditer(text)) if x is not None]
    items, seen = [], set()
    for item in data:
        if isinstance(item, str):
            item = {"tag": item, "explanation": ""}
        if not isinstance(item, dict) or not isinstance(item.get("tag"), str):
            continue
        tag = normalise_tag(item["tag"])
        if tag and tag not in seen and len(tag) <= 80:
            seen.add(tag)
            items.append({"tag": tag, "explanation": str(item.get("explanation", "")).strip()})
    return items


def keyphrase_tags(prompts: list[str], per_prompt: int = 3) -> list[list[dict]]:
    """Offline: the prompt's highest TF-IDF word 1–3-grams over the whole input, as tags."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 3), stop_words="english", min_df=1, sublinear_tf=True,
                                 token_pattern=r"(?u)\b[^\W\d_][\w'-]+\b")  # fmt: skip
    try:
        matrix = vectorizer.fit_transform(prompts)
    except ValueError:  # nothing but stop words
        return [[] for _ in prompts]
    terms = vectorizer.get_feature_names_out()
    out = []
    for i in range(matrix.shape[0]):
        row = matrix.getrow(i)
        order = row.indices[row.data.argsort()[::-1]]
        chosen: list[str] = []
        for j in order:
            term = terms[j]
            if not any(term in c or c in term for c in chosen):
                chosen.append(term)
            if len(chosen) == per_prompt:
                break
        out.append(
            [{"tag": normalise_tag(t), "explanation": "keyphrase of the prompt (offline proposal)"} for t in chosen]
        )
    return out


def endpoint_asker(url: str, model: str = "default", timeout_s: float = 120.0) -> Callable[[str, float], str]:
    import httpx

    client = httpx.Client(timeout=timeout_s)

    def ask(query: str, temperature: float) -> str:
        body = {"model": model, "temperature": temperature, "max_tokens": 512,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": TAG_PROMPT.format(query=query)}]}  # fmt: skip
        r = client.post(url.rstrip("/") + "/chat/completions", json=body)
        if r.status_code != 200:
            raise DataError(f"{url}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()["choices"][0]["message"]["content"] or ""

    return ask


def checkpoint_asker(model_dir: str, max_new_tokens: int = 256) -> Callable[[list[str], float], list[str]]:
    """Batched: a list of queries in, a list of answers out (our sampler; on CUDA when there is one)."""
    import torch

    from align.core.chatml import render
    from base_model import QwenTokenizer, load_pretrained
    from base_model.generate import SamplingParams, generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    tok = QwenTokenizer.from_file(model_dir)

    def ask(queries: list[str], temperature: float) -> list[str]:
        prompts = [render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": TAG_PROMPT.format(query=q)}],
                          tok, add_generation_prompt=True) for q in queries]  # fmt: skip
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.9 if temperature else 1.0,
                                stop_token_ids=(tok.im_end_id, tok.eod_id), vocab_limit=len(tok))  # fmt: skip
        out = generate(model.eval(), prompts, params, pad_id=tok.pad_id)
        return [tok.decode(t[:-1] if r == "stop" else t) for t, r in zip(out.token_ids, out.finish_reasons)]

    return ask


def raw_tags(
    input_path: str,
    out: str | Path,
    ask_one: Callable[[str, float], str] | None = None,
    ask_batch: Callable[[list[str], float], list[str]] | None = None,
    offline: bool = False,
    retries: int = 2,
    batch_size: int = 16,
    parallel: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Tag every prompt of `input_path` (open set) into `out`; returns the report (also `OUT.report.json`)."""
    if sum(x is not None and x is not False for x in (ask_one, ask_batch, offline)) != 1:
        raise DataError("give exactly one of --endpoint URL, --model DIR and --offline")
    prompts = [prompt_text(row) for _, row in iter_records(input_path)]
    if not prompts:
        raise DataError(f"{input_path}: no prompts")
    out = Path(out)
    done: set[int] = set()
    if out.exists():
        done = {r["index"] for r in read_appended_rows(out, repair=True)}
    todo = [i for i in range(len(prompts)) if i not in done]
    offline_tags = keyphrase_tags(prompts) if offline else None

    def tag_batch(indices: list[int]) -> list[dict]:
        rows = {i: {"index": i, "prompt": prompts[i], "tags": [], "explanations": {}, "status": "failed",
                    "attempts": 0, "last_answer": ""} for i in indices}  # fmt: skip
        pending = list(indices)
        for attempt in range(retries + 1):
            if not pending:
                break
            temperature = 0.0 if attempt == 0 else 0.7
            if offline_tags is not None:
                answers = [json.dumps(offline_tags[i]) for i in pending]
            elif ask_batch is not None:
                answers = ask_batch([prompts[i] for i in pending], temperature)
            else:
                with ThreadPoolExecutor(parallel) as pool:
                    answers = list(pool.map(lambda i: ask_one(prompts[i], temperature), pending))
            still = []
            for i, answer in zip(pending, answers):
                items = parse_tag_answer(answer)
                row = rows[i]
                row["attempts"] += 1
                row["last_answer"] = answer[:500]
                if items:
                    row.update(tags=[x["tag"] for x in items], explanations={x["tag"]: x["explanation"] for x in items},
                               status="ok")  # fmt: skip
                    del row["last_answer"]
                else:
                    still.append(i)
            pending = still if offline_tags is None else []
        return [rows[i] for i in indices]

    for start in range(0, len(todo), batch_size):
        batch = tag_batch(todo[start : start + batch_size])
        with out.open("a", encoding="utf-8") as f:
            for row in batch:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if progress:
            progress(len(batch))
    rows = read_appended_rows(out)
    failures = [{"index": r["index"], "prompt": r["prompt"][:200], "last_answer": r.get("last_answer", "")}
                for r in rows if r["status"] != "ok"]  # fmt: skip
    tags = [t for r in rows for t in r["tags"]]
    report = {"prompts": len(prompts), "tagged": len(rows) - len(failures), "failed": len(failures),
              "retried": sum(1 for r in rows if r["attempts"] > 1), "tags": len(tags), "distinct_tags": len(set(tags)),
              "source": "offline keyphrases" if offline else ("checkpoint" if ask_batch else "endpoint"),
              "failures": failures[:200]}  # fmt: skip
    write_json_atomic(out.with_name(out.name + ".report.json"), report)
    return report
