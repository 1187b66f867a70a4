"""The Taxonomy tab of the web page: reviewers search a taxonomy under review, inspect a tag (its path, the raw tags
merged into it with their counts, example prompts, the merges that formed it with their evidence, its placement),
and rename, move, split or undo a merge; every edit is a new version, listed with its author, and any version
downloads as a taxonomy file. Each handler checks the role again (`user_of`), as the REST API does."""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import gradio as gr

from labeling_ui.store import Conflict, Store
from rm.tags.taxonomy import TaxonomyError

HEADERS = ["id", "name", "parent", "aliases", "children", "prompts"]


def details_html(info: dict) -> str:
    e = html.escape
    path = " › ".join(e(p) for p in [*info["path"], info["id"]])
    aliases = ", ".join(f"{e(a['raw'])} ({a['prompts']})" for a in info["aliases"]) or "none"
    examples = "".join(f"<li>{e(x)}</li>" for x in info["examples"]) or "<li>none recorded</li>"
    merges = (
        "".join(
            f"<li>#{m['index']} {e(str(m.get('step')))}: {e(', '.join(map(str, m.get('merged', []))))} → "
            f"{e(str(m.get('into')))} <span class='note'>({e(str(m.get('evidence', '')))})"
            f"{'' if m['undoable'] else '; undone, or not undoable here'}</span></li>"
            for m in info["merges"]
        )
        or "<li>none</li>"
    )
    placements = (
        "".join(
            f"<li>{e(str(p.get('step')))} under {e(str(p.get('parent')))}: {e(str(p.get('evidence', '')))}</li>"
            for p in info["placements"]
        )
        or "<li>none</li>"
    )
    return (
        f"<div id='tag-details'><h4>{e(info['name'])} <code>{e(info['id'])}</code></h4><p>Path: {path}</p>"
        f"<p>Children: {len(info['children'])}. Raw tags merged in (prompts): {aliases}</p>"
        f"<p><b>Example prompts</b></p><ul>{examples}</ul><p><b>Merges</b></p><ul class='merges'>{merges}</ul>"
        f"<p><b>Placement</b></p><ul>{placements}</ul></div>"
    )


def build(store: Store, user_of):
    """The tab's components, inside the caller's `gr.Tab`; returns the taxonomy dropdown (filled at page load)."""

    def reviewer(request: gr.Request):
        return user_of(request, "reviewer", "admin")

    def search(name, query, request: gr.Request):
        reviewer(request)
        if not name:
            raise gr.Error("choose a taxonomy")
        version, rows = store.taxonomy_search(name, query or "", 200)
        table = [[r[h] for h in HEADERS] for r in rows]
        return version, table, f"Version {version}: {len(rows)} tag(s) shown."

    def show(name, tag_id, request: gr.Request):
        reviewer(request)
        if not name or not tag_id:
            return "", gr.update(choices=[], value=None), gr.update(choices=[], value=[]), None
        try:
            info = store.taxonomy_tag(name, tag_id)
        except KeyError as e:
            raise gr.Error(str(e.args[0])) from None
        merges = [(f"#{m['index']}: {', '.join(map(str, m.get('merged', [])))} → {m.get('into')}", m["index"])
                  for m in info["merges"] if m["undoable"]]  # fmt: skip
        aliases = [a["raw"] for a in info["aliases"]]
        return (details_html(info), gr.update(choices=merges, value=None), gr.update(choices=aliases, value=[]),
                info["version"])  # fmt: skip

    def pick(evt: gr.SelectData):
        return (evt.row_value or [""])[0]

    def edit(action, name, version, tag_id, new_name, parent, aliases, new_id, merge, query, request: gr.Request):
        user = reviewer(request)
        if not name or version is None:
            raise gr.Error("search the taxonomy first")
        detail = {
            "rename": lambda: {"tag": tag_id, "name": new_name or ""},
            "move": lambda: {"tag": tag_id, "parent": parent or None},
            "split": lambda: {"tag": tag_id, "aliases": list(aliases or []), "new_id": new_id or ""},
            "undo_merge": lambda: {"merge": merge},
        }[action]()
        try:
            new_version = store.edit_taxonomy(name, int(version), action, detail, user.name)
        except (TaxonomyError, Conflict) as e:
            raise gr.Error(str(e)) from None
        version, table, _ = search(name, query, request)
        details, merges, alias_choices, _ = show(name, tag_id, request)
        return (version, table, f"Saved version {new_version}: {action} {detail}.", details, merges, alias_choices,
                history(name, request))  # fmt: skip

    def history(name, request: gr.Request):
        reviewer(request)
        if not name:
            return []
        return [[h["version"], h["time"], h["author"], h["action"], str(h["detail"])]
                for h in reversed(store.taxonomy_history(name))]  # fmt: skip

    def export(name, request: gr.Request):
        user = reviewer(request)
        if not name:
            raise gr.Error("choose a taxonomy")
        text = store.export_taxonomy(name)
        store.audit(user.name, "taxonomy_export", taxonomy=name, via="page")
        path = Path(tempfile.mkdtemp(prefix="taxonomy-")) / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    version = gr.State(None)
    with gr.Row():
        name = gr.Dropdown(label="Taxonomy", choices=[], elem_id="taxonomy")
        query = gr.Textbox(label="Search tags (id, name or raw tag)", elem_id="tag-search")
        search_btn = gr.Button("Search", elem_id="tag-search-btn")
    status = gr.Markdown(elem_id="taxonomy-status")
    table = gr.Dataframe(headers=HEADERS, elem_id="tag-table", interactive=False)
    tag_id = gr.Textbox(label="Tag (click a row, or type its id)", elem_id="tag-id")
    details = gr.HTML(elem_id="tag-details-box")
    with gr.Row():
        new_name = gr.Textbox(label="New name", elem_id="new-name")
        rename_btn = gr.Button("Rename", elem_id="rename")
        parent = gr.Textbox(label="New parent (tag id; empty: top level)", elem_id="new-parent")
        move_btn = gr.Button("Move", elem_id="move")
    with gr.Row():
        aliases = gr.Dropdown(label="Raw tags to split off", multiselect=True, choices=[], elem_id="split-aliases")
        new_id = gr.Textbox(label="New tag id", elem_id="split-id")
        split_btn = gr.Button("Split", elem_id="split")
    with gr.Row():
        merge = gr.Dropdown(label="Merge to undo", choices=[], elem_id="merge")
        undo_btn = gr.Button("Undo merge", elem_id="undo-merge")
    gr.Markdown("#### Versions (newest first)")
    versions = gr.Dataframe(headers=["version", "time", "author", "action", "detail"], elem_id="tax-versions")
    with gr.Row():
        export_btn = gr.Button("Export the latest version (YAML)", elem_id="tax-export")
        exported = gr.File(label="Taxonomy file", elem_id="tax-file")

    search_btn.click(search, [name, query], [version, table, status]).then(history, [name], [versions])
    query.submit(search, [name, query], [version, table, status])
    name.change(search, [name, query], [version, table, status]).then(history, [name], [versions])
    table.select(pick, None, [tag_id]).then(show, [name, tag_id], [details, merge, aliases, version])
    tag_id.submit(show, [name, tag_id], [details, merge, aliases, version])
    outputs = [version, table, status, details, merge, aliases, versions]

    def handler(action: str):
        def run(name, version, tag_id, new_name, parent, aliases, new_id, merge, query, request: gr.Request):
            return edit(action, name, version, tag_id, new_name, parent, aliases, new_id, merge, query, request)

        return run

    for btn, action in ((rename_btn, "rename"), (move_btn, "move"), (split_btn, "split"), (undo_btn, "undo_merge")):
        btn.click(handler(action), [name, version, tag_id, new_name, parent, aliases, new_id, merge, query], outputs)
    export_btn.click(export, [name], [exported])
    return name
