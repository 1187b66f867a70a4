"""Atomic writes: the one way this project puts a file or a new folder in place.

Everything is written to a temporary sibling (the same folder, so the final rename is atomic) and renamed onto the
target only when the writing finished; a failure or a kill leaves the previous file (or nothing), never a partial
one. `base_model` sits at the bottom of the import graph, so every layer can use this.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """`.NAME.tmpPID` beside `path`: hidden, and distinct per process (two writers never share one)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write a file (or a new folder) to; on leaving the block it replaces `path`.

    A folder is renamed into place only where `path` does not exist yet (replacing a whole folder takes two renames;
    see `base_model.checkpoint`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields a new, empty temporary folder; on leaving the block it takes the place of `path` (a folder already
    there is moved aside first, then removed: the target is never half written)."""
    path = Path(path)
    tmp = temporary_sibling(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` in the place of `target` (two renames when `target` exists)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows) -> int:
    """Rows as JSON lines; returns how many were written."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_parquet_atomic(path: str | Path, rows, batch: int = 1000) -> int:
    """Rows (dicts) as a Parquet file, written in batches; returns how many were written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, writer, chunk = 0, None, []
    with atomic_path(path) as tmp:
        try:
            for row in rows:
                chunk.append(row)
                if len(chunk) == batch:
                    table = pa.Table.from_pylist(chunk)
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                    n, chunk = n + len(chunk), []
            if chunk or writer is None:
                table = pa.Table.from_pylist(chunk)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                n += len(chunk)
        finally:
            if writer is not None:
                writer.close()
    return n


def write_rows_atomic(path: str | Path, rows) -> int:
    """Rows as Parquet when `path` ends in .parquet, else as JSON lines."""
    return (write_parquet_atomic if Path(path).suffix == ".parquet" else write_jsonl_atomic)(path, rows)
