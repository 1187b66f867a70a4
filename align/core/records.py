"""Reading records from JSONL, JSON, Parquet or a `datasets` folder, with locations for error messages."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from align.core.config import relative_note
from base_model.atomic import write_jsonl_atomic  # noqa: F401  (records are written through it)


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or row) and the field."""


def iter_records(path: str | Path, on_bad_line: Callable[[str], None] | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) where location is `file:line` (JSONL) or `file:row N` (Parquet, datasets).

    A line that is not a JSON object raises DataError, or, with `on_bad_line`, is reported to it and skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found{relative_note(path)}")
    if path.is_dir():
        yield from _iter_datasets(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix in (".jsonl", ".json") or path.suffixes[-2:] in ([".jsonl", ".gz"], [".json", ".gz"]):
        yield from _iter_json(path, on_bad_line)
    else:
        raise DataError(
            f"{path}: unknown format (expected .jsonl, .json (either may be gzipped), .parquet or a datasets folder)"
        )


def _iter_json(path: Path, on_bad_line: Callable[[str], None] | None) -> Iterator[tuple[str, dict]]:
    if path.suffix == ".gz":
        import gzip

        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8")
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    else:
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if ".json" in path.suffixes[-2:] and ".jsonl" not in path.suffixes[-2:] and text.lstrip().startswith("["):
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


def read_appended_rows(path: str | Path, repair: bool = False) -> list[dict]:
    """The rows of a JSONL file that a run appends to as it goes (metrics, samples, resumable results).

    A process stopped while writing leaves its last line cut short (no newline after it): that line is left out,
    and with `repair` also cut from the file, so that the rows a resumed run appends start on a line of their own.
    Any other line that is not a JSON object is a DataError naming the file and line."""
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # the complete lines end here
    rows = []
    for lineno, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_as_dict(row, f"{path}:{lineno}"))
    tail = data[end:]
    whole = False
    if tail.strip():
        try:  # a last line without its newline may still be whole
            row = json.loads(tail)
            whole = isinstance(row, dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        if whole:
            rows.append(row)
    if repair and tail:
        with open(path, "r+b") as f:
            if whole:  # only its newline is missing
                f.seek(0, 2)
                f.write(b"\n")
            else:
                f.truncate(end)
    return rows


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


def iter_documents(paths: Iterable[str | Path], text_field: str) -> Iterator[tuple[str, dict, str]]:
    """(location, record, text) of every document of the files; a missing or non-string text field stops with the
    file and line named."""
    for path in paths:
        for where, record in iter_records(path):
            text = record.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"{where}: field '{text_field}' is missing or not a string")
            yield where, record, text


ROLES = ("system", "user", "assistant", "function", "tool")


def as_messages(prompt, where: str, field: str = "prompt", check: bool = True) -> list[dict]:
    """A prompt as a conversation: a string becomes one user message; a list must hold {'role', 'content'}
    messages with known roles. Anything else stops with the location and field named. `check=False` only wraps a
    string (for showing what is already stored, which was checked when it came in)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not check:
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field '{field}' must be a string or a non-empty list of messages")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{field}[{i}]' must be {{'role': str, 'content': str}}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{field}[{i}].role': unknown role {m['role']!r}")
    return prompt


@dataclass
class ComparisonRecord:
    """One prompt, 2..K candidate responses and, once ranked, the rank of each (1 = best, equal = tie): what the
    labelling app imports (unranked) and exports (ranked), and what the reward model trains on.

        {"prompt": [{"role": "user", "content": "…"}] or "…", "responses": ["…", "…"], "ranking": [1, 2],
         "strength": 0.8, "tags": ["math/arithmetic"], "annotator": "ann-3", "source": "human"}

    Other keys a writer adds (the labelling export's `annotators`, `task_id`, …) travel in `extra`, unchanged."""

    prompt: list[dict]
    responses: list[str]
    ranking: list[int] | None = None
    strength: float | None = None
    tags: list[str] = field(default_factory=list)
    annotator: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    FIELDS = ("prompt", "responses", "ranking", "strength", "tags", "annotator", "source")

    @staticmethod
    def problems(d, where: str, ranked: bool, known_tags: set[str] | None = None) -> list[str]:
        """Every problem of a record (empty when it is valid); `ranked` requires a ranking."""
        if not isinstance(d, dict):
            return [f"{where}: not a JSON object"]
        out = []
        try:
            as_messages(d.get("prompt"), where)
        except DataError as e:
            out.append(str(e))
        responses = d.get("responses")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            out.append(f"{where}: field 'responses' must be a list of at least 2 strings")
            responses = None
        ranking = d.get("ranking")
        if ranked or ranking is not None:
            if (
                not isinstance(ranking, list)
                or (responses is not None and len(ranking) != len(responses))
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranking)
            ):
                out.append(f"{where}: field 'ranking' must hold one rank (an integer >= 1) per response")
        strength = d.get("strength")
        if strength is not None and (not isinstance(strength, (int, float)) or isinstance(strength, bool)):
            out.append(f"{where}: field 'strength' must be a number")
        tags = d.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            out.append(f"{where}: field 'tags' must be a list of strings")
        elif known_tags is not None and (unknown := [t for t in tags if t not in known_tags]):
            out.append(f"{where}: unknown tag(s) {', '.join(map(repr, unknown))}")
        return out

    @classmethod
    def parse(cls, d, where: str, ranked: bool = True) -> "ComparisonRecord":
        """The record of a dict; the first problem stops with the location and field named."""
        problems = cls.problems(d, where, ranked)
        if problems:
            raise DataError(problems[0])
        return cls(
            as_messages(d["prompt"], where),
            d["responses"],
            d.get("ranking"),
            d.get("strength"),
            d.get("tags") or [],
            d.get("annotator"),
            d.get("source") or "",
            {k: v for k, v in d.items() if k not in cls.FIELDS},
        )

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "responses": self.responses,
            "ranking": self.ranking,
            "strength": self.strength,
            "tags": self.tags,
            "annotator": self.annotator,
            "source": self.source,
            **self.extra,
        }
