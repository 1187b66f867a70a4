"""The JSON REST API (FastAPI), used by the web page, scripts and load tests. Every endpoint checks the role.

Sessions are bearer tokens from `/api/login` (ended by `/api/logout`, expiring after the store's session life);
failed logins back off per user name and per client address (429 with Retry-After). Bad input is a 4xx naming
the field (`labeling_ui.validate`), a body over the size limit a 413; a database busy past its timeout is a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError

from align.core.records import ComparisonRecord, DataError, as_messages
from labeling_ui import taxonomy_api
from labeling_ui.agreement import project_report
from labeling_ui.auth import LoginThrottle, check_login
from labeling_ui.export import comparison_record
from labeling_ui.store import Conflict, Store, User, WouldWait, dumps
from labeling_ui.validate import (
    MAX_BODY_BYTES,
    MAX_ID,
    MAX_OVERLAP,
    annotation_problems,
    item_problems,
    rank_problem,
    text_problem,
)


class Login(BaseModel):
    username: str = Field(max_length=200)
    password: str = Field(max_length=1000)


class Members(BaseModel):
    users: list[str] = Field(min_length=1, max_length=1000)


class AnnotationIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    ranks: list[int] | None = Field(None, max_length=64)
    skip: bool = False
    all_bad: bool = False
    unsafe: str | None = Field(None, max_length=100)
    tags: list[str] = Field(default_factory=list, max_length=1000)
    rationale: str = Field("", max_length=100_000)
    strength: float | None = None


def validate_items(items: list, known_tags: set[str] | None = None) -> list[str]:
    """Every problem of an import, item by item (the import is refused as a whole if there is any)."""
    return [
        e
        for i, item in enumerate(items)
        for e in ComparisonRecord.problems(item, f"item {i}", ranked=False, known_tags=known_tags)
        + item_problems(item, f"item {i}")
    ]


def readable(rows: list) -> tuple[list, list[str]]:
    """The store's (task, annotations) rows without annotations that cannot be read as a ranking of their task
    (stored before input was checked), and a line for each one left out: exports and agreement never fail on them."""
    out, bad = [], []
    for task, anns in rows:
        responses = task.responses if isinstance(task.responses, list) else []
        if len(responses) < 2:
            bad.append(f"task {task.id}: its responses are not a list of at least 2")
            continue
        keep = []
        for ann, name in anns:
            if ann.skipped or ann.ranks is None:
                keep.append((ann, name))
            elif problem := rank_problem(ann.ranks, len(responses)):
                bad.append(f"task {task.id}, annotation {ann.id} by {name}: {problem}")
            else:
                keep.append((ann, name))
        out.append((task, keep))
    return out, bad


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def checked_name(name: str, field: str = "project") -> str:
    if problem := text_problem(name, field, 200):
        raise HTTPException(422, problem)
    return name


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


def create_app(
    store: Store,
    known_tags: set[str] | None = None,
    throttle: LoginThrottle | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(title="Labelling API")
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    throttle = throttle or LoginThrottle()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """422 naming each field, without echoing the input (a NaN or a 10 MB string would not serialise)."""
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(OperationalError)
    async def busy(request: Request, exc: OperationalError):
        return JSONResponse(
            {"detail": "the database is busy; try again"}, status_code=503, headers={"Retry-After": "1"}
        )

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer") if store.serial_writes else None

    async def call(fn, *args, write: bool = False, long: bool = False, **kwargs):
        """A store call from an async endpoint. On SQLite a read runs right here (WAL readers never wait), and so
        does a write when the database is free (no hop to a thread, which under load costs more than the query); a
        write that would wait (another connection holds the write lock: an import, another process) goes to one
        writer thread instead, so the event loop, reads and logins never wait for it. On PostgreSQL, which serves
        requests in parallel, every call runs in the thread pool."""
        if writer is not None:
            if not write:
                return fn(*args, **kwargs)
            if long:  # an import: in a pool thread, taking the write lock chunk by chunk, never queueing the others
                return await run_in_threadpool(fn, *args, **kwargs)
            with contextlib.suppress(WouldWait):
                return store.now(fn, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(writer, functools.partial(fn, *args, **kwargs))
        return await run_in_threadpool(fn, *args, **kwargs)

    def bearer(authorization: str | None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing bearer token")
        return authorization.removeprefix("Bearer ").strip()

    async def current_user(authorization: str | None = Header(default=None)) -> User:
        user = await call(store.user_by_token, bearer(authorization))
        if user is None:
            raise HTTPException(401, "invalid or expired token: log in again")
        return user

    async def member(name: str, user: User) -> None:
        """404 unless the user may work on the project (a member, or an admin): other projects are not shown."""
        if not await call(store.may_see, checked_name(name), user):
            raise HTTPException(404, f"no project {name!r} for you (an admin adds members)")

    def role(*allowed: str):
        async def check(user: User = Depends(current_user)) -> User:
            if user.role not in allowed:
                raise HTTPException(403, f"this needs the role {' or '.join(allowed)}")
            return user

        return check

    @app.post("/api/login")
    def login(body: Login, request: Request):
        if problem := text_problem(body.username, "username", 200) or text_problem(body.password, "password", 1000):
            raise HTTPException(422, problem)
        keys = (f"user:{body.username}", f"addr:{request.client.host if request.client else '?'}")
        wait = throttle.retry_after(*keys)
        if wait > 0:
            raise HTTPException(
                429, "too many failed logins; wait and try again", headers={"Retry-After": str(math.ceil(wait))}
            )
        user = store.user_by_name(body.username)
        ok = check_login(body.password, user.password_hash if user is not None else None)
        if not ok or user.disabled:
            throttle.failed(*keys)
            store.audit(body.username, "login_failed", address=keys[1].removeprefix("addr:"))
            raise HTTPException(401, "wrong user name or password")
        throttle.succeeded(keys[0])
        store.audit(user.name, "login", address=keys[1].removeprefix("addr:"))
        return {"token": store.new_token(user.id), "role": user.role}

    @app.post("/api/logout")
    async def logout(authorization: str | None = Header(default=None)):
        if not await call(store.end_session, bearer(authorization), write=True):
            raise HTTPException(401, "invalid or expired token")
        return {"ok": True}

    @app.get("/api/tasks/next")
    async def next_task(
        project: str = Query(..., max_length=200), user: User = Depends(role("annotator", "reviewer", "admin"))
    ):
        await member(project, user)
        task = await call(store.next_task, project, user.id, write=True)
        if task is None:
            return Response(status_code=204)
        return {
            "id": task.id,
            "prompt": as_messages(task.prompt, f"task {task.id}", check=False),
            "responses": task.responses,
            "tags": task.tags,
        }

    @app.post("/api/tasks/{task_id}/annotations", status_code=201)
    async def annotate(
        body: AnnotationIn,
        task_id: int = PathParam(ge=1, le=MAX_ID),
        user: User = Depends(role("annotator", "reviewer", "admin")),
    ):
        if not body.skip and not body.ranks:
            raise HTTPException(422, "field 'ranks' must give each response a rank (or send skip: true)")

        def check(task) -> None:
            k = len(task.responses)
            problems = annotation_problems(
                k, body.ranks, body.strength, body.unsafe, body.tags, body.rationale, known_tags, skip=body.skip
            )
            if problems:
                raise ValueError("; ".join(problems))

        try:
            ann_id = await call(
                store.submit,
                task_id,
                user.id,
                check=check,
                ranks=None if body.skip else body.ranks,
                skipped=body.skip,
                all_bad=body.all_bad,
                unsafe=body.unsafe or None,
                tags=body.tags,
                rationale=body.rationale,
                strength=body.strength,
                write=True,
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
        name: str,
        request: Request,
        overlap: int = Query(1, ge=1, le=MAX_OVERLAP),
        user: User = Depends(role("admin")),
    ):
        checked_name(name)
        try:
            items = await request.json()
        except ValueError:
            raise HTTPException(400, "body is not JSON") from None
        if not isinstance(items, list):
            raise HTTPException(400, "body must be a JSON list of tasks")
        errors = await run_in_threadpool(validate_items, items, known_tags)  # a large import: off the event loop
        if errors:
            raise HTTPException(422, {"message": "import refused; nothing was imported", "errors": errors[:100]})
        return {
            "imported": await call(store.import_tasks, name, items, overlap, actor=user.name, write=True, long=True)
        }

    @app.get("/api/projects/{name}/export", response_class=PlainTextResponse)
    def export(
        name: str,
        rule: Literal["majority", "ranked_pairs"] = "majority",
        user: User = Depends(role("admin", "reviewer")),
    ):
        if not store.may_see(checked_name(name), user):
            raise HTTPException(404, f"no project {name!r} for you (an admin adds members)")
        try:
            rows, bad = readable(store.annotations(name))
        except KeyError as e:
            raise HTTPException(404, str(e)) from None
        records = [r for t, anns in rows if (r := comparison_record(t, anns, rule)) is not None]
        store.audit(user.name, "export", project=name, rule=rule, records=len(records), left_out=len(bad))
        return "".join(dumps(r) + "\n" for r in records)

    @app.get("/api/projects/{name}/agreement")
    def project_agreement(name: str, user: User = Depends(role("admin", "reviewer"))):
        """Agreement overall and per tag, per-annotator statistics and the flagged queue; annotations that cannot
        be read as rankings of their task (stored before input was checked) are listed under `left_out`."""
        if not store.may_see(checked_name(name), user):
            raise HTTPException(404, f"no project {name!r} for you (an admin adds members)")
        try:
            rows, bad = readable(store.annotations(name))
        except KeyError as e:
            raise HTTPException(404, str(e)) from None
        return {**project_report(rows), "left_out": bad}

    @app.get("/api/projects/{name}/progress")
    async def progress(name: str, user: User = Depends(current_user)):
        await member(name, user)
        return await call(store.progress, name, user.id)

    @app.post("/api/projects/{name}/undo")
    async def undo(name: str, user: User = Depends(role("annotator", "reviewer", "admin"))):
        await member(name, user)
        task_id = await call(store.undo_last, name, user.id, write=True)
        if task_id is None:
            raise HTTPException(404, "nothing to undo")
        return {"task": task_id}

    @app.post("/api/projects/{name}/members", status_code=201)
    def add_members(name: str, body: Members, user: User = Depends(role("admin"))):
        for i, who in enumerate(body.users):
            checked_name(who, f"users[{i}]")
        try:
            store.add_members(checked_name(name), body.users, actor=user.name)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None
        return {"members": store.members(name)}

    @app.delete("/api/projects/{name}/members/{who}")
    def remove_member(name: str, who: str, user: User = Depends(role("admin"))):
        try:
            store.remove_member(checked_name(name), checked_name(who, "user"), actor=user.name)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None
        return {"members": store.members(name)}

    @app.get("/api/projects/{name}/members")
    def list_members(name: str, user: User = Depends(role("admin"))):
        return {"members": store.members(checked_name(name))}

    taxonomy_api.add_routes(app, store, role)

    @app.get("/api/audit", response_class=PlainTextResponse)
    def audit_log(user: User = Depends(role("admin"))):
        """The audit log (logins, failures, imports, exports, account changes) as JSON lines."""
        return "".join(dumps(r) + "\n" for r in store.audit_log())

    return app
