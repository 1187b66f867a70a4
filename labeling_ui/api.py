"""The JSON REST API (FastAPI), used by the web page, scripts and load tests. Every endpoint checks the role."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field

from align.core.records import ComparisonRecord, DataError, as_messages
from labeling_ui.agreement import project_report
from labeling_ui.auth import verify_password
from labeling_ui.export import comparison_record
from labeling_ui.store import Conflict, Store, User, dumps


class Login(BaseModel):
    username: str
    password: str


class AnnotationIn(BaseModel):
    ranks: list[int] | None = None
    skip: bool = False
    all_bad: bool = False
    unsafe: str | None = None
    tags: list[str] = Field(default_factory=list)
    rationale: str = ""
    strength: float | None = Field(None, ge=0, le=1)


def validate_items(items: list, known_tags: set[str] | None = None) -> list[str]:
    """Every problem of an import, item by item (the import is refused as a whole if there is any)."""
    return [
        e
        for i, item in enumerate(items)
        for e in ComparisonRecord.problems(item, f"item {i}", ranked=False, known_tags=known_tags)
    ]


def read_task_file(path: Path, known_tags: set[str] | None = None) -> list[dict]:
    """The tasks of a JSONL file for import: every problem, each with its file and line, or the tasks."""
    items, problems = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg})")
            continue
        problems += ComparisonRecord.problems(item, where, ranked=False, known_tags=known_tags)
        items.append(item)
    if problems:
        raise DataError("import refused; nothing was imported:\n  " + "\n  ".join(problems))
    return items


def create_app(store: Store, known_tags: set[str] | None = None) -> FastAPI:
    app = FastAPI(title="Labelling API")

    async def call(fn, *args, **kwargs):
        """A quick store call from an async endpoint. On SQLite, whose writes run one at a time anyway, it runs right
        here: no hop to a worker thread and back per request, which under load costs more than the query. On
        PostgreSQL, which serves requests in parallel, it runs in the thread pool."""
        if store.serial_writes:
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    async def current_user(authorization: str | None = Header(default=None)) -> User:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing bearer token")
        user = await call(store.user_by_token, authorization.removeprefix("Bearer ").strip())
        if user is None:
            raise HTTPException(401, "invalid token")
        return user

    def role(*allowed: str):
        async def check(user: User = Depends(current_user)) -> User:
            if user.role not in allowed:
                raise HTTPException(403, f"this needs the role {' or '.join(allowed)}")
            return user

        return check

    @app.post("/api/login")
    def login(body: Login):
        user = store.user_by_name(body.username)
        if user is None or not verify_password(body.password, user.password_hash):
            raise HTTPException(401, "wrong user name or password")
        return {"token": store.new_token(user.id), "role": user.role}

    @app.get("/api/tasks/next")
    async def next_task(project: str = Query(...), user: User = Depends(role("annotator", "reviewer", "admin"))):
        task = await call(store.next_task, project, user.id)
        if task is None:
            return Response(status_code=204)
        return {
            "id": task.id,
            "prompt": as_messages(task.prompt, f"task {task.id}", check=False),
            "responses": task.responses,
            "tags": task.tags,
        }

    @app.post("/api/tasks/{task_id}/annotations", status_code=201)
    async def annotate(task_id: int, body: AnnotationIn, user: User = Depends(role("annotator", "reviewer", "admin"))):
        if not body.skip:
            if body.ranks is None or not body.ranks or any(r < 1 for r in body.ranks):
                raise HTTPException(422, "'ranks' must give each response a rank >= 1 (or send skip: true)")
        try:
            ann_id = await call(
                store.submit,
                task_id,
                user.id,
                ranks=None if body.skip else body.ranks,
                skipped=body.skip,
                all_bad=body.all_bad,
                unsafe=body.unsafe,
                tags=body.tags,
                rationale=body.rationale,
                strength=body.strength,
                expected_k=True,
            )
        except KeyError as e:
            raise HTTPException(404, str(e)) from None
        except Conflict as e:
            raise HTTPException(409, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return {"id": ann_id}

    @app.post("/api/projects/{name}/tasks", status_code=201)
    async def import_tasks(
        name: str, request: Request, overlap: int = Query(1, ge=1), user: User = Depends(role("admin"))
    ):
        try:
            items = await request.json()
        except ValueError:
            raise HTTPException(400, "body is not JSON") from None
        if not isinstance(items, list):
            raise HTTPException(400, "body must be a JSON list of tasks")
        errors = validate_items(items, known_tags)
        if errors:
            raise HTTPException(400, {"message": "import refused; nothing was imported", "errors": errors})
        return {"imported": store.import_tasks(name, items, overlap)}

    @app.get("/api/projects/{name}/export", response_class=PlainTextResponse)
    def export(
        name: str,
        rule: Literal["majority", "ranked_pairs"] = "majority",
        user: User = Depends(role("admin", "reviewer")),
    ):
        try:
            rows = store.annotations(name)
        except KeyError as e:
            raise HTTPException(404, str(e)) from None
        records = [comparison_record(t, anns, rule) for t, anns in rows]
        return "".join(dumps(r) + "\n" for r in records if r is not None)

    @app.get("/api/projects/{name}/agreement")
    def project_agreement(name: str, user: User = Depends(role("admin", "reviewer"))):
        """Agreement overall and per tag, per-annotator statistics and the flagged queue."""
        try:
            return project_report(store.annotations(name))
        except KeyError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/api/projects/{name}/progress")
    async def progress(name: str, user: User = Depends(current_user)):
        return await call(store.progress, name, user.id)

    @app.post("/api/projects/{name}/undo")
    async def undo(name: str, user: User = Depends(role("annotator", "reviewer", "admin"))):
        task_id = await call(store.undo_last, name, user.id)
        if task_id is None:
            raise HTTPException(404, "nothing to undo")
        return {"task": task_id}

    return app
