"""K candidate responses per prompt from a checkpoint, one sampling setting each, written as tasks JSONL for import.

Varying the setting (greedy, then hotter and wider) gives annotators responses that really differ, which is what
makes a comparison informative."""

from __future__ import annotations

from pathlib import Path

from align.core.chatml import render
from align.core.records import as_messages, iter_records, write_jsonl_atomic
from base_model import QwenTokenizer, load_pretrained
from base_model.generate import SamplingParams, generate

SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_p=0.95),
    dict(temperature=1.2, top_k=50),
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.5, top_p=1.0),
]


def sampling_settings(k: int) -> list[dict]:
    if not 2 <= k <= len(SETTINGS):
        raise ValueError(f"k must be between 2 and {len(SETTINGS)}, got {k}")
    return SETTINGS[:k]


def generate_candidates(
    model_dir: Path,
    prompts_file: Path,
    out: Path,
    k: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    progress=None,
) -> int:
    """K responses per prompt, each from its own sampling setting, written to `out` as tasks; `progress(n)` is told
    how many prompts each batch finished."""
    from align.core.distributed import device

    model = load_pretrained(model_dir, device=device())  # the GPU when there is one
    tokenizer = QwenTokenizer.from_file(model_dir)
    rows = []
    for where, rec in iter_records(prompts_file):
        prompt = as_messages(rec.get("prompt"), where)
        rows.append({"prompt": prompt, "tags": rec.get("tags") or [], "meta": rec.get("meta") or {}})
    settings = sampling_settings(k)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids = [render(r["prompt"], tokenizer, add_generation_prompt=True) for r in batch]
        for r in batch:
            r["responses"], r["meta"]["sampling"] = [], settings
        for j, setting in enumerate(settings):
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                stop_token_ids=(tokenizer.im_end_id, tokenizer.eod_id),
                seed=seed + 1000 * j + start,
                vocab_limit=len(tokenizer),
                **setting,
            )
            out_ids = generate(model, ids, params, pad_id=tokenizer.pad_id).token_ids
            for r, toks in zip(batch, out_ids):
                r["responses"].append(tokenizer.decode(toks, skip_special_tokens=True).strip())
        if progress is not None:
            progress(len(batch))
    write_jsonl_atomic(out, rows)
    return len(rows)
