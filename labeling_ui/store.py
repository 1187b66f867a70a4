"""`Store`, the labelling app's database (SQLAlchemy): projects, tasks, leases and annotations here; users, sessions,
membership and the audit log in `accounts.py`; tables, migrations and the hot path's statements in `schema.py`.
Nothing else in the project talks to the database.

SQLite by default (WAL mode, a file in the working folder), PostgreSQL when given a `postgresql://` URL. The
schema is created by the app and migrated forward by `schema.MIGRATIONS` (its version lives in `schema_version`).
Handing out the next task is one transaction: the annotator's unexpired lease if any, else the first task with
fewer (annotations + live leases) than its overlap that the annotator has not touched. A task that has all its
annotations is marked `closed` in the transaction that adds the last one (an undo reopens it), so the search
reads open tasks only, through an index, however many are done. A skip is the annotator's own: the task is never
shown to them again and the skip does not fill an overlap slot.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, delete, event, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from align.core.config import ConfigError
from labeling_ui import schema
from labeling_ui.accounts import Accounts, Conflict
from labeling_ui.schema import (
    DROP_EXPIRED_LEASES,
    FILLED,
    HELD_TASK,
    LEASE_CREATED,
    NEW_LEASE,
    NEXT_TASK,
    NEXT_TASK_LOCKED,
    PROJECT_ID,
    RELEASE_LEASE,
    SET_CLOSED,
    TAKEN,
    TASK,
    TASK_LOCKED,
    Annotation,
    Base,
    Lease,
    Member,
    Project,
    Task,
    User,
    task_from_row,
)
from labeling_ui.taxonomies import Taxonomies


class StoreError(ConfigError):
    """The database a URL or path names cannot be used: not a URL, a SQLite file in a folder that does not exist,
    a server that refuses the connection or the login."""


def database_url(value: str) -> str:
    """The SQLAlchemy URL for what a user gives as the database: a URL as it is (`postgresql://` goes through psycopg
    3, the driver we ship), anything else the path of a SQLite file (made if missing; its folder must exist)."""
    if value.startswith("postgresql://"):
        return "postgresql+psycopg://" + value.removeprefix("postgresql://")
    if "://" in value:
        return value
    if not value.strip():
        raise StoreError("database: empty path (give a SQLite file's path or a postgresql:// URL)")
    path = Path(value).expanduser()
    if not path.parent.is_dir():
        raise StoreError(f"database {value}: folder {path.parent} does not exist")
    return f"sqlite:///{path}"


def shown_url(url: str) -> str:
    """A URL fit for a message: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


class WouldWait(Exception):
    """A write inside `Store.now` found the database (or this process's write lock) taken; nothing was written."""


class _NoLock:
    def acquire(self, blocking: bool = True) -> bool:
        return True

    def release(self) -> None:
        pass


_NO_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("no_wait", default=False)
BUSY_TIMEOUT_MS = 30_000


class _SlotTaken(Exception):
    """A task's last free slot went to another annotator between our count and our lock (PostgreSQL)."""


IMPORT_CHUNK = 500  # tasks per transaction of an import: other writers get the lock in between


class Store(Accounts, Taxonomies):
    """The labelling database: tasks, leases and annotations here, accounts in `Accounts`, taxonomies under review
    in `Taxonomies`."""

    def __init__(self, url: str = "sqlite:///labels.db", lease_seconds: int = 600, session_hours: float = 12) -> None:
        given, url = url, database_url(url)
        self.url = url
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.session_life = dt.timedelta(hours=session_hours)
        # a server connection can drop between requests; a SQLite file cannot (a ping per checkout costs 0.1 ms)
        pool = {} if url.startswith("sqlite") else {"pool_size": 20, "max_overflow": 60, "pool_pre_ping": True}
        try:
            self.engine = create_engine(url, future=True, **pool)
        except (ArgumentError, ImportError) as e:
            raise StoreError(f"database {shown_url(given)}: not a database URL this app can use ({e})") from None
        if url.startswith("sqlite"):

            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _):
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")  # an acknowledged annotation survives a kill
                cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                cur.close()

        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time. Writers of this process queue on a lock and start the moment the last one
        # commits; left to SQLite's busy handler they would poll with sleeps of up to 100 ms (the p99 of a busy
        # server). Other processes writing the same file still wait through busy_timeout.
        self.serial_writes = url.startswith("sqlite")
        self._write_lock = threading.Lock() if self.serial_writes else _NoLock()
        try:
            self.migrate()
        except OperationalError as e:
            self.engine.dispose()
            reason = str(e.orig if e.orig is not None else e).strip().splitlines()[0]
            raise StoreError(f"database {shown_url(given)}: cannot be opened: {reason}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """A read-write transaction, committed on leaving the block (rolled back on an exception). Inside `now()`
        it never waits: the process's write lock is taken only if free and SQLite's busy timeout is 0, and a write
        that would wait raises WouldWait instead."""
        no_wait = _NO_WAIT.get()
        if not self._write_lock.acquire(blocking=not no_wait):
            raise WouldWait
        try:
            with self.sessions.begin() as s:
                if self.serial_writes:
                    wanted = 0 if no_wait else BUSY_TIMEOUT_MS
                    info = s.connection().info  # per pooled connection: set only when it changes
                    if info.get("busy_timeout") != wanted:
                        s.connection().connection.dbapi_connection.execute(f"PRAGMA busy_timeout={wanted}")
                        info["busy_timeout"] = wanted
                yield s
        finally:
            self._write_lock.release()

    def now(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` if its writes can run at once, else WouldWait (nothing written): an event loop calls
        this and hands a write that would wait to a thread."""
        token = _NO_WAIT.set(True)
        try:
            return fn(*args, **kwargs)
        except OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise WouldWait from None
            raise
        finally:
            _NO_WAIT.reset(token)

    def migrate(self) -> int:
        """Create missing tables, then add what each later schema version added; returns the version reached."""
        existed = inspect(self.engine).has_table("annotations")
        Base.metadata.create_all(self.engine)
        with self._write() as s:
            return schema.migrate(s, existed)

    # ------------------------------------------------------------------------------------- projects/tasks

    def import_tasks(
        self,
        project: str,
        items: list[dict],
        overlap: int,
        guidelines: str | None = None,
        actor: str = "cli",
        progress=None,
    ) -> int:
        """Validated items in, all or nothing: written IMPORT_CHUNK tasks per transaction, so annotators' writes
        interleave with a long import; if a chunk fails, the chunks already written are deleted again."""
        with self._write() as s:
            proj = s.scalar(select(Project).where(Project.name == project))
            created = proj is None
            if created:
                proj = Project(name=project, guidelines=guidelines or "")
                s.add(proj)
                s.flush()
            elif guidelines is not None:
                proj.guidelines = guidelines
            project_id = proj.id
        written: list[int] = []
        try:
            for start in range(0, len(items), IMPORT_CHUNK):
                with self._write() as s:
                    tasks = [
                        Task(
                            project_id=project_id,
                            prompt=item["prompt"],
                            responses=item["responses"],
                            tags=item.get("tags") or [],
                            meta=item.get("meta") or {},
                            overlap=overlap,
                            closed=False,
                        )
                        for item in items[start : start + IMPORT_CHUNK]
                    ]
                    s.add_all(tasks)
                    s.flush()
                    written += [t.id for t in tasks]
                if progress is not None:
                    progress(len(written), len(items))
                time.sleep(0.01)  # the write lock is not fair: let a waiting annotator's write in between chunks
        except BaseException:
            with self._write() as s:  # the chunks already written go again (with anything done to them meanwhile)
                for i in range(0, len(written), 1000):
                    ids = written[i : i + 1000]
                    s.execute(delete(Lease).where(Lease.task_id.in_(ids)))
                    s.execute(delete(Annotation).where(Annotation.task_id.in_(ids)))
                    s.execute(delete(Task).where(Task.id.in_(ids)))
                if created:
                    s.execute(delete(Member).where(Member.project_id == project_id))
                    s.execute(delete(Project).where(Project.id == project_id))
            raise
        self.audit(actor, "import", project=project, tasks=len(items), overlap=overlap)
        return len(items)

    def next_task(self, project: str, user_id: int, now: dt.datetime | None = None) -> Task | None:
        """The annotator's unexpired lease in the project, else a new lease on the first open task they have not
        touched whose annotations plus live leases are fewer than its overlap. Plain statements compiled once: this
        runs for every `next` (on the event loop, on SQLite), and building ORM queries cost three times the query."""
        sqlite = self.serial_writes
        for _ in range(20):  # a concurrent annotator may win the same slot; try the next one
            now = now or dt.datetime.utcnow()
            try:
                with self._write() as s:
                    c = s.connection()
                    # a write first: on SQLite it takes the write lock, so what follows is read and written alone
                    c.execute(DROP_EXPIRED_LEASES, {"user": user_id, "now": now})
                    project_id = c.execute(PROJECT_ID, {"name": project}).scalar()
                    if project_id is None:
                        return None
                    args = {"user": user_id, "project": project_id, "now": now}
                    if mine := c.execute(HELD_TASK, args).first():
                        return task_from_row(mine)
                    row = c.execute(NEXT_TASK if sqlite else NEXT_TASK_LOCKED, args).first()
                    if row is None:
                        return None
                    # PostgreSQL: the count above may predate a lease committed before we locked the row; recount
                    if not sqlite and c.execute(TAKEN, {"task": row.id, "now": now}).scalar() >= row.overlap:
                        raise _SlotTaken  # rolls this transaction back; try the next task
                    c.execute(NEW_LEASE, {"task": row.id, "user": user_id, "expires": now + self.lease, "created": now})
                    return task_from_row(row)
            except (IntegrityError, _SlotTaken):  # a unique lease violated, or the slot taken meanwhile
                continue
        raise Conflict("could not lease a task after 20 attempts")

    def submit(self, task_id: int, user_id: int, check=None, **fields) -> int:
        """Store an annotation for a task the user holds a lease on; exactly once, in one transaction."""
        args = {"task": task_id, "user": user_id}
        with self._write() as s:
            c = s.connection()
            lease = c.execute(LEASE_CREATED, args).first()
            released = c.execute(RELEASE_LEASE, args).rowcount
            row = c.execute(TASK if self.serial_writes else TASK_LOCKED, args).first()
            if row is None:
                raise KeyError(f"task {task_id} not found")
            if not released:
                raise Conflict(f"task {task_id} is not leased to you (request it with /api/tasks/next)")
            task = task_from_row(row)
            if check is not None:
                check(task)  # raises ValueError: what the annotation must match in its task (ranks, strength)
            skip = bool(fields.get("skipped"))
            count = c.execute(FILLED, args).scalar()
            full = not skip and count >= task.overlap  # an expired lease someone else's annotation filled
            if not full:  # (when full, the lease's release is still committed)
                closed = count + (0 if skip else 1) >= task.overlap  # a skip fills no slot
                if closed != task.closed:
                    c.execute(SET_CLOSED, {"task": task_id, "closed": closed})
                seconds = (dt.datetime.utcnow() - lease.created).total_seconds() if lease and lease.created else None
                insert = Annotation.__table__.insert().values(
                    task_id=task_id, user_id=user_id, seconds=seconds, **fields
                )
                ann_id = c.execute(insert).inserted_primary_key[0]
        if full:
            raise Conflict(f"task {task_id} already has its {task.overlap} annotations")
        return ann_id

    def annotations(self, project: str) -> list[tuple[Task, list[tuple[Annotation, str]]]]:
        with self.sessions() as s:
            proj = s.scalar(select(Project).where(Project.name == project))
            if proj is None:
                raise KeyError(f"project {project!r} not found")
            tasks = s.scalars(select(Task).where(Task.project_id == proj.id).order_by(Task.id)).all()
            rows = s.execute(
                select(Annotation, User.name)
                .join(User, User.id == Annotation.user_id)
                .join(Task, Task.id == Annotation.task_id)
                .where(Task.project_id == proj.id)
            ).all()
        by_task: dict[int, list] = {}
        for ann, name in rows:
            by_task.setdefault(ann.task_id, []).append((ann, name))
        return [(t, by_task.get(t.id, [])) for t in tasks]

    def task(self, task_id: int) -> Task | None:
        with self.sessions() as s:
            return s.get(Task, task_id)

    def undo_last(self, project: str, user_id: int) -> int | None:
        """Withdraw the user's last submission in a project and hand its task back to them; returns the task id."""
        with self._write() as s:
            ann = s.scalar(
                select(Annotation)
                .join(Task, Task.id == Annotation.task_id)
                .join(Project, Project.id == Task.project_id)
                .where(Project.name == project, Annotation.user_id == user_id)
                .order_by(Annotation.id.desc())
                .limit(1)
            )
            if ann is None:
                return None
            task_id = ann.task_id
            s.delete(ann)
            s.flush()
            task = s.get(Task, task_id)
            filled = s.scalar(select(func.count()).where(Annotation.task_id == task_id, Annotation.skipped.is_(False)))
            task.closed = filled >= task.overlap  # an undone ranking reopens its slot; an undone skip held none
            s.query(Lease).filter(Lease.user_id == user_id).delete()  # the undone task comes next
            now = dt.datetime.utcnow()
            s.add(Lease(task_id=task_id, user_id=user_id, expires=now + self.lease, created=now))
            return task_id

    def progress(self, project: str, user_id: int) -> dict[str, int]:
        """done/remaining for the annotator and for the project (annotation slots = tasks x overlap)."""
        with self.sessions() as s:
            proj = s.scalar(select(Project).where(Project.name == project))
            if proj is None:
                return {"mine_done": 0, "mine_remaining": 0, "project_done": 0, "project_total": 0}
            in_proj = select(Task.id).where(Task.project_id == proj.id)
            mine = s.scalar(
                select(func.count())
                .select_from(Annotation)
                .where(Annotation.user_id == user_id, Annotation.task_id.in_(in_proj))
            )
            n_ann = (
                select(func.count())
                .where(Annotation.task_id == Task.id, Annotation.skipped.is_(False))
                .scalar_subquery()
            )
            open_for_me = s.scalar(
                select(func.count())
                .select_from(Task)
                .where(
                    Task.project_id == proj.id,
                    n_ann < Task.overlap,
                    Task.id.not_in(select(Annotation.task_id).where(Annotation.user_id == user_id)),
                )
            )
            done = s.scalar(
                select(func.count())
                .select_from(Annotation)
                .where(Annotation.task_id.in_(in_proj), Annotation.skipped.is_(False))
            )
            total = s.scalar(select(func.coalesce(func.sum(Task.overlap), 0)).where(Task.project_id == proj.id))
        return {"mine_done": mine, "mine_remaining": open_for_me, "project_done": done, "project_total": int(total)}

    def guidelines(self, project: str) -> str:
        with self.sessions() as s:
            return s.scalar(select(Project.guidelines).where(Project.name == project)) or ""

    def counts(self) -> dict[str, int]:
        with self.sessions() as s:
            return {
                "tasks": s.scalar(select(func.count()).select_from(Task)),
                "annotations": s.scalar(select(func.count()).select_from(Annotation)),
            }


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
