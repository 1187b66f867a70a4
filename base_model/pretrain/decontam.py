"""n-gram decontamination against evaluation sets: `align data decontaminate`.

Text is normalised (NFKC, lower case, punctuation dropped, whitespace folded) and split into units: words, with
every CJK character its own unit. A training document that shares any n-gram of units (n = 13 by default) with an
evaluation item is dropped, and the report names the evaluation item it matched.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

from align.core.records import DataError, iter_documents, iter_records
from base_model.atomic import write_json_atomic, write_jsonl_atomic

_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


# the fields of evaluation items: generic ones, GSM8K, MATH, HumanEval and MBPP
FIELDS = ("text", "question", "prompt", "answer", "input", "output", "problem", "solution", "canonical_solution",
          "code", "test_list")  # fmt: skip


def units(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def ngram_keys(text: str, n: int) -> set[bytes]:
    u = units(text)
    return {hashlib.blake2b("\x1f".join(u[i : i + n]).encode(), digest_size=8).digest() for i in range(len(u) - n + 1)}


def _eval_text(record: dict, fields: tuple[str, ...]) -> str:
    parts = []
    for f in fields:
        v = record.get(f)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts += [x if isinstance(x, str) else x.get("content", "") for x in v if isinstance(x, (str, dict))]
    return " ".join(parts)


def build_index(
    eval_files: list[str | Path],
    n: int,
    fields: tuple[str, ...] = FIELDS,
) -> dict[bytes, str]:
    """n-gram key → the evaluation item (`file:line`) it came from."""
    index: dict[bytes, str] = {}
    for path in eval_files:
        for where, record in iter_records(path):
            for key in ngram_keys(_eval_text(record, fields), n):
                index.setdefault(key, where)
    if not index:
        raise DataError(f"{', '.join(map(str, eval_files))}: no evaluation item is {n} units long")
    return index


def decontaminate(
    inputs: list[str | Path],
    output: str | Path,
    eval_files: list[str | Path],
    n: int = 13,
    text_field: str = "text",
    report_path: str | Path | None = None,
) -> dict:
    index = build_index(eval_files, n)
    dropped = []

    def kept_records():
        for where, record, text in iter_documents(inputs, text_field):
            match = next((index[k] for k in ngram_keys(text, n) if k in index), None)
            if match is None:
                yield record
            else:
                dropped.append({"document": where, "id": record.get("id"), "matched": match})

    kept = write_jsonl_atomic(output, kept_records())
    report = {"kept": kept, "dropped": len(dropped), "n": n, "matches": dropped}
    if report_path is not None:
        write_json_atomic(report_path, report)
    return report
