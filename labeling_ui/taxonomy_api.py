"""The REST API of taxonomies under review (`labeling_ui/taxonomies.py`): reviewers and admins search, inspect,
edit and export; admins import. Edits name the version they were made from (409 when another edit came first);
an edit the taxonomy refuses is a 422 with the reason."""

from __future__ import annotations

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from labeling_ui.store import Conflict, Store, User
from rm.tags.review import from_rows
from rm.tags.taxonomy import TaxonomyError


class TaxonomyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    tags: list[dict] = Field(min_length=1, max_length=200_000)
    merges: list[dict] = Field(default_factory=list, max_length=500_000)
    placements: list[dict] = Field(default_factory=list, max_length=500_000)
    examples: dict[str, list[str]] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)


class EditIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_version: int = Field(ge=1)
    action: str = Field(max_length=40)
    detail: dict = Field(default_factory=dict)


def add_routes(app: FastAPI, store: Store, role) -> None:
    reviewers = role("reviewer", "admin")

    def found(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None

    @app.post("/api/taxonomies", status_code=201)
    def import_taxonomy(body: TaxonomyIn, user: User = Depends(role("admin"))):
        try:
            taxonomy = from_rows(body.tags, body.name)
        except (TaxonomyError, KeyError, TypeError, AttributeError) as e:
            raise HTTPException(422, f"tags: {e}") from None
        try:
            version = store.import_taxonomy(body.name, taxonomy, body.merges, body.placements, body.examples,
                                            body.counts, actor=user.name)  # fmt: skip
        except Conflict as e:
            raise HTTPException(409, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return {"name": body.name, "version": version, "tags": len(taxonomy)}

    @app.get("/api/taxonomies")
    def list_taxonomies(user: User = Depends(reviewers)):
        return {"taxonomies": store.taxonomies()}

    @app.get("/api/taxonomies/{name}/tags")
    def search(name: str, q: str = Query("", max_length=200), limit: int = Query(50, ge=1, le=1000),
               user: User = Depends(reviewers)):  # fmt: skip
        version, rows = found(store.taxonomy_search, name, q, limit)
        return {"version": version, "tags": rows}

    @app.get("/api/taxonomies/{name}/tag")
    def tag(name: str, id: str = Query(max_length=1000), version: int | None = Query(None, ge=1),
            user: User = Depends(reviewers)):  # fmt: skip
        return found(store.taxonomy_tag, name, id, version)

    @app.post("/api/taxonomies/{name}/edits", status_code=201)
    def edit(name: str, body: EditIn, user: User = Depends(reviewers)):
        try:
            version = found(store.edit_taxonomy, name, body.base_version, body.action, body.detail, user.name)
        except Conflict as e:
            raise HTTPException(409, str(e)) from None
        except TaxonomyError as e:
            raise HTTPException(422, str(e)) from None
        return {"version": version}

    @app.get("/api/taxonomies/{name}/versions")
    def history(name: str, user: User = Depends(reviewers)):
        return {"versions": found(store.taxonomy_history, name)}

    @app.get("/api/taxonomies/{name}/export", response_class=PlainTextResponse)
    def export(name: str, version: int | None = Query(None, ge=1), user: User = Depends(reviewers)):
        text = found(store.export_taxonomy, name, version)
        store.audit(user.name, "taxonomy_export", taxonomy=name, version=version)
        return text
