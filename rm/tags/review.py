"""A reviewer's edits of a built taxonomy: rename, move, split, undo a merge (the labelling app's Taxonomy tab).

Each edit takes a taxonomy and returns a new one (the old is untouched), checked as a loaded file is (ids, parents,
cycles, aliases claimed twice), so an edit that would break the taxonomy is refused with the reason. A built tag's
aliases are the raw tags merged into it, so moving aliases is moving raw tags: `tags assign --method data` and the
audit read the result as they read any taxonomy file.
"""

from __future__ import annotations

import copy

from rm.tags.taxonomy import Tag, Taxonomy, TaxonomyError, _key

ACTIONS = ("rename", "move", "split", "undo_merge")


def _copy(tax: Taxonomy) -> list[Tag]:
    return [copy.deepcopy(t) for t in tax.tags.values()]


def _tag(tax: Taxonomy, tag_id: str) -> Tag:
    if tag_id not in tax.tags:
        raise TaxonomyError(f"no tag {tag_id!r}")
    return tax.tags[tag_id]


def rename(tax: Taxonomy, tag_id: str, name: str) -> Taxonomy:
    """A new display name; the old one stays as an alias, so data written with it still resolves."""
    name = name.strip()
    if not name:
        raise TaxonomyError("the new name is empty")
    old = _tag(tax, tag_id).name
    tags = _copy(tax)
    for t in tags:
        if t.id == tag_id:
            t.name = name
            if _key(old) not in {_key(name), _key(t.id)} and old not in t.aliases:
                t.aliases.append(old)
    return Taxonomy(tags, tax.source)


def move(tax: Taxonomy, tag_id: str, parent: str | None) -> Taxonomy:
    """Under another parent (None: a root)."""
    _tag(tax, tag_id)
    parent = parent or None
    if parent is not None:
        _tag(tax, parent)
    tags = _copy(tax)
    for t in tags:
        if t.id == tag_id:
            t.parent = parent
    return Taxonomy(tags, tax.source)


def split(tax: Taxonomy, tag_id: str, aliases: list[str], new_id: str) -> Taxonomy:
    """Some of a tag's aliases become a tag of their own (`new_id`, the same parent)."""
    tag = _tag(tax, tag_id)
    new_id = new_id.strip()
    if not new_id:
        raise TaxonomyError("the new tag needs an id")
    if new_id in tax.tags:
        raise TaxonomyError(f"a tag {new_id!r} exists already")
    wanted = {_key(a) for a in aliases}
    moving = [a for a in tag.aliases if _key(a) in wanted]
    missing = wanted - {_key(a) for a in moving}
    if wanted & {_key(tag.id), _key(tag.name)}:
        raise TaxonomyError(f"{sorted(aliases)[0]!r} is the same name as {tag_id!r} (case and separators aside): it "
                            "cannot leave it")  # fmt: skip
    if missing or not moving:
        raise TaxonomyError(f"{tag_id!r} has no alias {sorted(missing)[0] if missing else ''!r}".replace(" ''", ""))
    tags = _copy(tax)
    for t in tags:
        if t.id == tag_id:
            t.aliases = [a for a in t.aliases if a not in moving]
    tags.append(Tag(new_id, new_id, tag.parent, [a for a in moving if _key(a) != _key(new_id)]))
    return Taxonomy(tags, tax.source)


def undo_merge(tax: Taxonomy, merge: dict) -> Taxonomy:
    """A merge of the build (`merges.jsonl`: {"step", "into", "merged", "evidence"}) undone: each merged tag leaves
    the tag that holds it now and becomes a tag again, beside it, with the spellings that the rule step had merged
    into it (the aliases equal to it after normalisation). A merged spelling equal to its tag's name (case and
    separators aside) cannot be told apart from it, and stays."""
    from rm.tags.builder import rule_key

    merged = [m for m in merge.get("merged", []) if isinstance(m, str)]
    if not merged:
        raise TaxonomyError("the merge names no merged tags")
    tags = _copy(tax)
    by_id = {t.id: t for t in tags}
    apart = []
    for m in merged:
        holder_id = tax.resolve(m)
        if holder_id is None:
            raise TaxonomyError(f"{m!r} is not in the taxonomy")
        if holder_id == m or m in by_id:
            raise TaxonomyError(f"{m!r} is a tag of its own already")
        if _key(m) not in {_key(holder_id), _key(by_id[holder_id].name)}:
            apart.append(m)
    if not apart:
        raise TaxonomyError(f"{', '.join(map(repr, merged))}: the same name as the tag holding them, case and "
                            "separators aside, so a taxonomy cannot hold them apart")  # fmt: skip
    for m in apart:  # spellings equal to their tag's name stay with it
        holder = by_id[tax.resolve(m)]
        key = rule_key(m)
        if merge.get("step") == "rule":
            leaving = [a for a in holder.aliases if _key(a) == _key(m)]
        else:
            leaving = [a for a in holder.aliases if rule_key(a) == key]
        holder.aliases = [a for a in holder.aliases if a not in leaving]
        new = Tag(m, m, holder.parent, [a for a in leaving if a != m])
        tags.append(new)
        by_id[m] = new
    return Taxonomy(tags, tax.source)


def apply(tax: Taxonomy, action: str, detail: dict, merges: list[dict] | None = None) -> Taxonomy:
    """One edit by name, its arguments in `detail` (what the REST API and the page send)."""

    def need(field: str, kind=str):
        value = detail.get(field)
        if not isinstance(value, kind):
            raise TaxonomyError(f"{action}: field {field!r} must be a {kind.__name__}")
        return value

    if action == "rename":
        return rename(tax, need("tag"), need("name"))
    if action == "move":
        parent = detail.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise TaxonomyError("move: field 'parent' must be a tag id or null")
        return move(tax, need("tag"), parent)
    if action == "split":
        aliases = need("aliases", list)
        if not all(isinstance(a, str) for a in aliases):
            raise TaxonomyError("split: 'aliases' must be a list of strings")
        return split(tax, need("tag"), aliases, need("new_id"))
    if action == "undo_merge":
        index = detail.get("merge")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(merges or []):
            raise TaxonomyError(f"undo_merge: field 'merge' must be the index of one of the {len(merges or [])} merges")
        return undo_merge(tax, merges[index])
    raise TaxonomyError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")


def as_rows(tax: Taxonomy) -> list[dict]:
    """The taxonomy as the file's `tags` list."""
    return [
        {"id": t.id, "name": t.name, **({"parent": t.parent} if t.parent else {}),
         **({"aliases": list(t.aliases)} if t.aliases else {})}
        for t in tax.tags.values()
    ]  # fmt: skip


def from_rows(rows: list[dict], source: str = "<taxonomy>") -> Taxonomy:
    return Taxonomy(
        [Tag(r["id"], r.get("name") or r["id"], r.get("parent"), list(r.get("aliases") or [])) for r in rows], source
    )
