"""n-gram decontamination against evaluation sets: `align data decontaminate`.

Text is normalised (NFKC, lower case, punctuation dropped, whitespace folded) and split into units: words, with
every CJK character its own unit. A training document that shares any n-gram of units (n = 13 by default) with an
evaluation item is dropped, and the report names the evaluation item it matched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path

from align.core.records import DataError, iter_records

_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def units(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def ngram_keys(text: str, n: int) -> set[bytes]:
    u = units(text)
    return {hashlib.blake2b("\x1f".join(u[i:i + n]).encode(), digest_size=8).digest()
            for i in range(len(u) - n + 1)}


def _eval_text(record: dict, fields: tuple[str, ...]) -> str:
    parts = []
    for f in fields:
        v = record.get(f)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts += [x if isinstance(x, str) else x.get("content", "") for x in v if isinstance(x, (str, dict))]
    return " ".join(parts)


def build_index(eval_files: list[str | Path], n: int,
                fields: tuple[str, ...] = ("text", "question", "prompt", "answer", "input", "output")
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


def decontaminate(inputs: list[str | Path], output: str | Path, eval_files: list[str | Path], n: int = 13,
                  text_field: str = "text", report_path: str | Path | None = None) -> dict:
    index = build_index(eval_files, n)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    dropped, kept = [], 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for path in inputs:
                for where, record in iter_records(path):
                    text = record.get(text_field)
                    if not isinstance(text, str):
                        raise DataError(f"{where}: field '{text_field}' is missing or not a string")
                    match = next((index[k] for k in ngram_keys(text, n) if k in index), None)
                    if match is None:
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        kept += 1
                    else:
                        dropped.append({"document": where, "id": record.get("id"), "matched": match})
        tmp.replace(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report = {"kept": kept, "dropped": len(dropped), "n": n, "matches": dropped}
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
