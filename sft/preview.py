"""`align sft preview`: show what the loss sees (trained tokens highlighted)."""

from __future__ import annotations

import sys

from align.core.losses import IGNORE_INDEX
from align.core.records import iter_records
from base_model import QwenTokenizer
from sft.data import MaskMode, SkipExample, build_example, record_tools, to_messages

HIGHLIGHT, RESET = "\033[1;42;30m", "\033[0m"


def render_preview(ids: list[int], labels: list[int], tokenizer: QwenTokenizer, color: bool) -> str:
    """Trained spans in reverse-video green (or between ⟦ ⟧ without colour)."""
    out, run, trained = [], [], None
    for token, label in zip(ids, labels):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            out.append(_span(run, trained, tokenizer, color))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        out.append(_span(run, trained, tokenizer, color))
    return "".join(out)


def _span(tokens: list[int], trained: bool, tokenizer: QwenTokenizer, color: bool) -> str:
    text = tokenizer.decode(tokens)
    if not trained:
        return text
    return f"{HIGHLIGHT}{text}{RESET}" if color else f"⟦{text}⟧"


def preview(
    path: str, tokenizer: QwenTokenizer, max_len: int, mask_mode: MaskMode, limit: int, color: bool | None = None
) -> None:
    color = sys.stdout.isatty() if color is None else color
    shown = 0
    for where, record in iter_records(path):
        if shown >= limit:
            break
        try:
            tools = record_tools(record, where)
            ex = build_example(to_messages(record, where), tokenizer, max_len, mask_mode, tools=tools)
        except SkipExample as e:
            print(f"--- {where}: skipped ({e})\n")
            continue
        n_trained = sum(l != IGNORE_INDEX for l in ex["labels"])
        print(f"--- {where}: {len(ex['input_ids'])} tokens, {n_trained} trained ({mask_mode})")
        print(render_preview(ex["input_ids"], ex["labels"], tokenizer, color))
        shown += 1
