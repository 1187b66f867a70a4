"""Taxonomies under review: the reviewers' half of the labelling `Store` for the Taxonomy tab and its REST API.

A built taxonomy (`align tags build`'s folder) is imported once with its merges, placements and example prompts.
Each reviewer edit (`rm/tags/review.py`: rename, move, split, undo a merge; or a revert to an earlier version) is a
transaction that stores a new version with its author, time and arguments, and an audit entry; an edit made from a
version that is no longer the latest is refused (Conflict), so two reviewers never overwrite each other. Any version
exports as a taxonomy file that `align tags assign` and `align tags audit` read.
"""

from __future__ import annotations

import datetime as dt

import yaml
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from labeling_ui.accounts import Conflict
from labeling_ui.schema import TaxonomyVersion, TaxonomyWorkspace
from rm.tags.review import apply as apply_edit
from rm.tags.review import as_rows, from_rows
from rm.tags.taxonomy import Taxonomy, TaxonomyError

EXAMPLES_PER_TAG = 3


def examples_by_raw_tag(rows, tags_field: str = "tags", per_tag: int = EXAMPLES_PER_TAG) -> tuple[dict, dict]:
    """({raw tag: a few prompts}, {raw tag: prompts tagged with it}) from raw-tag rows (`align tags raw`'s output:
    a prompt as `prompt`, `instruction` or `messages`, and its raw tags)."""
    examples: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        prompt = row.get("prompt") or row.get("instruction") or row.get("messages") or ""
        if isinstance(prompt, list):
            prompt = next(
                (m.get("content", "") for m in reversed(prompt) if isinstance(m, dict) and m.get("role") == "user"), ""
            )
        for tag in row.get(tags_field) or []:
            if not isinstance(tag, str):
                continue
            counts[tag] = counts.get(tag, 0) + 1
            if len(examples.setdefault(tag, [])) < per_tag and isinstance(prompt, str) and prompt:
                examples[tag].append(prompt[:400])
    return examples, counts


def _undoable(tax: Taxonomy, merge: dict) -> bool:
    """Whether undoing the merge would change this version (not undone already, not spellings it cannot hold apart)."""
    try:
        apply_edit(tax, "undo_merge", {"merge": 0}, [merge])
    except TaxonomyError:
        return False
    return True


class Taxonomies:
    """Methods of `Store` (which supplies `sessions`, `_write()` and `_audit`) on taxonomies under review."""

    def import_taxonomy(self, name: str, taxonomy: Taxonomy, merges: list | None = None, placements: list | None = None,
                        examples: dict | None = None, counts: dict | None = None, actor: str = "cli") -> int:  # fmt: skip
        """A new taxonomy at version 1; Conflict when the name is taken."""
        if not name or len(name) > 200 or name != name.strip():
            raise ValueError(f"taxonomy name {name!r} must be 1-200 characters without surrounding spaces")
        now = dt.datetime.utcnow()
        with self._write() as s:
            if s.scalar(select(TaxonomyWorkspace.id).where(TaxonomyWorkspace.name == name)) is not None:
                raise Conflict(f"taxonomy {name!r} exists already")
            ws = TaxonomyWorkspace(name=name, created=now, merges=list(merges or []),
                                   placements=list(placements or []), examples=dict(examples or {}),
                                   counts=dict(counts or {}))  # fmt: skip
            s.add(ws)
            s.flush()
            s.add(TaxonomyVersion(taxonomy_id=ws.id, version=1, created=now, author=actor, action="import",
                                  detail={"tags": len(taxonomy)}, tags=as_rows(taxonomy)))  # fmt: skip
            self._audit(s, actor, "taxonomy_import", {"taxonomy": name, "tags": len(taxonomy)})
        return 1

    def taxonomies(self) -> list[dict]:
        with self.sessions() as s:
            latest = (
                select(TaxonomyVersion.taxonomy_id, func.max(TaxonomyVersion.version).label("v"))
                .group_by(TaxonomyVersion.taxonomy_id)
                .subquery()
            )
            rows = s.execute(
                select(TaxonomyWorkspace.name, latest.c.v)
                .join(latest, latest.c.taxonomy_id == TaxonomyWorkspace.id)
                .order_by(TaxonomyWorkspace.id)
            ).all()
        return [{"name": n, "version": v} for n, v in rows]

    def _workspace(self, s, name: str) -> TaxonomyWorkspace:
        ws = s.scalar(select(TaxonomyWorkspace).where(TaxonomyWorkspace.name == name))
        if ws is None:
            raise KeyError(f"no taxonomy {name!r}")
        return ws

    def taxonomy_workspace(self, name: str) -> dict:
        """What the build recorded: merges, placements, examples and counts per raw tag."""
        with self.sessions() as s:
            ws = self._workspace(s, name)
            return {"merges": ws.merges, "placements": ws.placements, "examples": ws.examples, "counts": ws.counts}

    def taxonomy_version(self, name: str, version: int | None = None) -> tuple[int, Taxonomy]:
        """(version, taxonomy): the latest, or the version asked for (KeyError when there is none)."""
        with self.sessions() as s:
            ws = self._workspace(s, name)
            q = select(TaxonomyVersion).where(TaxonomyVersion.taxonomy_id == ws.id)
            q = q.where(TaxonomyVersion.version == version) if version is not None else q
            row = s.scalar(q.order_by(TaxonomyVersion.version.desc()).limit(1))
            if row is None:
                raise KeyError(f"taxonomy {name!r} has no version {version}")
            return row.version, from_rows(row.tags, f"{name} v{row.version}")

    def taxonomy_history(self, name: str) -> list[dict]:
        with self.sessions() as s:
            ws = self._workspace(s, name)
            rows = s.scalars(
                select(TaxonomyVersion).where(TaxonomyVersion.taxonomy_id == ws.id).order_by(TaxonomyVersion.version)
            ).all()
            return [{"version": r.version, "time": r.created.isoformat() + "Z", "author": r.author,
                     "action": r.action, "detail": r.detail, "tags": len(r.tags)} for r in rows]  # fmt: skip

    def edit_taxonomy(self, name: str, base_version: int, action: str, detail: dict, actor: str) -> int:
        """Apply one edit to `base_version`, which must be the latest; returns the new version. TaxonomyError for
        an edit the taxonomy refuses, Conflict when someone else's edit came first."""
        with self._write() as s:
            ws = self._workspace(s, name)
            latest = s.scalar(
                select(TaxonomyVersion)
                .where(TaxonomyVersion.taxonomy_id == ws.id)
                .order_by(TaxonomyVersion.version.desc())
                .limit(1)
            )
            if latest.version != base_version:
                raise Conflict(f"taxonomy {name!r} is at version {latest.version}, not {base_version}: reload it")
            current = from_rows(latest.tags, name)
            if action == "revert":
                target = detail.get("version")
                if not isinstance(target, int) or isinstance(target, bool):
                    raise TaxonomyError(f"revert: field 'version' must be a version number, got {target!r:.40}")
                row = s.scalar(select(TaxonomyVersion).where(TaxonomyVersion.taxonomy_id == ws.id,
                                                             TaxonomyVersion.version == target))  # fmt: skip
                if row is None:
                    raise TaxonomyError(f"revert: no version {target!r}")
                new = from_rows(row.tags, name)
            else:
                new = apply_edit(current, action, detail, ws.merges)
            version = latest.version + 1
            s.add(TaxonomyVersion(taxonomy_id=ws.id, version=version, created=dt.datetime.utcnow(), author=actor,
                                  action=action, detail=detail, tags=as_rows(new)))  # fmt: skip
            try:
                s.flush()
            except IntegrityError:
                raise Conflict(f"taxonomy {name!r} changed while you edited it: reload it") from None
            self._audit(
                s, actor, "taxonomy_edit", {"taxonomy": name, "version": version, "edit": action, "detail": detail}
            )
            return version

    def export_taxonomy(self, name: str, version: int | None = None) -> str:
        """A version as taxonomy-file YAML."""
        v, tax = self.taxonomy_version(name, version)
        header = f"# taxonomy {name!r}, version {v}, exported from the labelling app\n"
        return header + yaml.safe_dump({"tags": as_rows(tax)}, allow_unicode=True, sort_keys=False)

    def taxonomy_search(self, name: str, query: str = "", limit: int = 50) -> tuple[int, list[dict]]:
        """(version, tags matching `query` in id, name or an alias — all when empty —, most prompts first)."""
        version, tax = self.taxonomy_version(name)
        counts = self.taxonomy_workspace(name)["counts"]
        q = query.strip().lower()
        rows = []
        for t in tax.tags.values():
            if q and not any(q in text.lower() for text in (t.id, t.name, *t.aliases)):
                continue
            prompts = sum(counts.get(raw, 0) for raw in (t.id, *t.aliases))
            rows.append({"id": t.id, "name": t.name, "parent": t.parent or "", "aliases": len(t.aliases),
                         "children": len(tax.children[t.id]), "prompts": prompts})  # fmt: skip
        rows.sort(key=lambda r: (-r["prompts"], r["id"]))
        return version, rows[:limit]

    def taxonomy_tag(self, name: str, tag_id: str, version: int | None = None) -> dict:
        """A tag as a reviewer inspects it: its path, aliases (the raw tags merged into it, with counts), children,
        example prompts, the merges that formed it (with their index, for undo) and its placement's evidence."""
        v, tax = self.taxonomy_version(name, version)
        if tag_id not in tax.tags:
            raise KeyError(f"taxonomy {name!r} has no tag {tag_id!r}")
        ws = self.taxonomy_workspace(name)
        t = tax.tags[tag_id]
        members = [t.id, *t.aliases]
        merges = [{"index": i, **m, "undoable": _undoable(tax, m)} for i, m in enumerate(ws["merges"])
                  if m.get("into") in members or any(x in members for x in m.get("merged", []))]  # fmt: skip
        return {
            "version": v,
            "id": t.id,
            "name": t.name,
            "parent": t.parent,
            "path": list(reversed(tax.ancestors(t.id))),
            "aliases": [{"raw": a, "prompts": ws["counts"].get(a, 0)} for a in t.aliases],
            "children": tax.children[t.id],
            "examples": [e for raw in members for e in ws["examples"].get(raw, [])][:10],
            "merges": merges,
            "placements": [p for p in ws["placements"] if p.get("tag") == t.id],
        }


def import_build(store, name: str, folder, prompts=None, tags_field: str = "tags", actor: str = "cli") -> int:
    """An `align tags build` folder (taxonomy.yaml, merges.jsonl, placements.jsonl when built with a hierarchy),
    with example prompts and counts from the raw-tag rows it was built from (`prompts`, optional)."""
    from pathlib import Path

    from align.core.records import iter_records

    folder = Path(folder)
    taxonomy = Taxonomy.load(folder / "taxonomy.yaml")
    merges = [row for _, row in iter_records(folder / "merges.jsonl")] if (folder / "merges.jsonl").exists() else []
    placements = (
        [row for _, row in iter_records(folder / "placements.jsonl")] if (folder / "placements.jsonl").exists() else []
    )
    examples, counts = (
        examples_by_raw_tag((row for _, row in iter_records(prompts)), tags_field) if prompts else ({}, {})
    )
    return store.import_taxonomy(name, taxonomy, merges, placements, examples, counts, actor)
