"""Reading records from JSONL, JSON, Parquet or a `datasets` folder, with locations for error messages."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or row) and the field."""


def iter_records(path: str | Path, on_bad_line: Callable[[str], None] | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) where location is `file:line` (JSONL) or `file:row N` (Parquet, datasets).

    A line that is not a JSON object raises DataError, or, with `on_bad_line`, is reported to it and skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        yield from _iter_datasets(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _iter_json(path, on_bad_line)
    else:
        raise DataError(f"{path}: unknown format (expected .jsonl, .json, .parquet or a datasets folder)")


def _iter_json(path: Path, on_bad_line: Callable[[str], None] | None) -> Iterator[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            yield f"{path}:item {i}", _as_dict(row, f"{path}:item {i}")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            row = _as_dict(row, where)
        except DataError as e:
            if on_bad_line is None:
                raise
            on_bad_line(str(e))
            continue
        yield where, row


def _as_dict(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file is empty")
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _iter_datasets(path: Path) -> Iterator[tuple[str, dict]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load a datasets folder ({e})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: use its train split
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (has {', '.join(ds.keys())})")
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError(f"{path}: dataset is empty")
    for i, row in enumerate(ds):
        yield f"{path}:row {i}", row


def write_jsonl_atomic(path: str | Path, rows) -> int:
    """Write rows as JSONL through a temporary file; a failure leaves no partial output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
