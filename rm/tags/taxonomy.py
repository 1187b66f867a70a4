"""A hierarchical tag taxonomy (domain → category → tag) with ids, aliases and a `safety` subtree.

File format (YAML or JSON):

    tags:
      - {id: safety, name: Safety}
      - {id: safety/violence, parent: safety, aliases: [violent content, gore]}
      - {id: math, name: Mathematics}
      - {id: math/arithmetic, parent: math, aliases: [addition, sums]}

Loading rejects duplicate ids, unknown parents, cycles and aliases claimed by two tags, naming the file and entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from base_model.atomic import write_text_atomic

CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no tag id, name or alias holds one (a database refuses NUL)


class TaxonomyError(ValueError):
    pass


@dataclass
class Tag:
    id: str
    name: str
    parent: str | None = None
    aliases: list[str] = field(default_factory=list)


def _key(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


class Taxonomy:
    def __init__(self, tags: list[Tag], source: str = "<taxonomy>") -> None:
        self.source = source
        self.tags: dict[str, Tag] = {}
        for i, t in enumerate(tags):
            bad = next((x for x in (t.id, t.name, *t.aliases) if CONTROL.search(x)), None)
            if bad is not None:
                raise TaxonomyError(f"{source}: entry tags[{i}]: {bad!r} holds a control character")
            if t.id in self.tags:
                raise TaxonomyError(f"{source}: entry tags[{i}]: duplicate id {t.id!r}")
            self.tags[t.id] = t
        for i, t in enumerate(tags):
            if t.parent is not None and t.parent not in self.tags:
                raise TaxonomyError(f"{source}: entry tags[{i}] ({t.id!r}): unknown parent {t.parent!r}")
        for i, t in enumerate(tags):
            seen, node = {t.id}, t
            while node.parent is not None:
                if node.parent in seen:
                    raise TaxonomyError(f"{source}: entry tags[{i}] ({t.id!r}): cycle through {node.parent!r}")
                seen.add(node.parent)
                node = self.tags[node.parent]
        self._names: dict[str, str] = {}
        for i, t in enumerate(tags):
            for name in [t.id, t.name, *t.aliases]:
                k = _key(name)
                if self._names.get(k, t.id) != t.id:
                    raise TaxonomyError(
                        f"{source}: entry tags[{i}] ({t.id!r}): alias {name!r} already names {self._names[k]!r}"
                    )
                self._names[k] = t.id
        self.children: dict[str, list[str]] = {t: [] for t in self.tags}
        for t in tags:
            if t.parent is not None:
                self.children[t.parent].append(t.id)

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except FileNotFoundError:
            raise TaxonomyError(f"{path}: taxonomy file not found") from None
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise TaxonomyError(f"{path}: cannot parse: {e}") from None
        entries = data.get("tags") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise TaxonomyError(f"{path}: expected a top-level 'tags' list")
        tags = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("id"), str) or not e["id"]:
                raise TaxonomyError(f"{path}: entry tags[{i}]: needs a non-empty string 'id'")
            aliases = e.get("aliases") or []
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise TaxonomyError(f"{path}: entry tags[{i}] ({e['id']!r}): 'aliases' must be a list of strings")
            tags.append(Tag(e["id"], e.get("name") or e["id"].rsplit("/", 1)[-1], e.get("parent"), aliases))
        return cls(tags, str(path))

    def save(self, path: str | Path) -> None:
        """As JSON for a `.json` path, else YAML; atomically (a kill leaves the old file or the new one)."""
        rows = [
            {
                "id": t.id,
                "name": t.name,
                **({"parent": t.parent} if t.parent else {}),
                **({"aliases": t.aliases} if t.aliases else {}),
            }
            for t in self.tags.values()
        ]
        if Path(path).suffix == ".json":
            text = json.dumps({"tags": rows}, ensure_ascii=False, indent=1)
        else:
            text = yaml.safe_dump({"tags": rows}, allow_unicode=True, sort_keys=False)
        write_text_atomic(path, text)

    def __len__(self) -> int:
        return len(self.tags)

    def __contains__(self, tag_id: str) -> bool:
        return tag_id in self.tags

    def resolve(self, name: str) -> str | None:
        """A tag id from an id, a name or an alias (case and separators ignored)."""
        return self._names.get(_key(name))

    def ancestors(self, tag_id: str) -> list[str]:
        out, node = [], self.tags[tag_id]
        while node.parent is not None:
            out.append(node.parent)
            node = self.tags[node.parent]
        return out

    def in_subtree(self, tag_id: str, root: str) -> bool:
        return tag_id == root or root in self.ancestors(tag_id)

    def subtree(self, root: str) -> list[str]:
        out, stack = [], [root]
        while stack:
            t = stack.pop()
            out.append(t)
            stack.extend(self.children.get(t, []))
        return out

    def leaves(self) -> list[str]:
        return [t for t, c in self.children.items() if not c]


# A typed view of the file format, so `configs/taxonomy/*.yaml` load like every other shipped config.
from pydantic import BaseModel, ConfigDict  # noqa: E402


class TagEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str | None = None
    parent: str | None = None
    aliases: list[str] = []


class TaxonomyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: list[TagEntry]
