"""The one module that talks to the database (SQLAlchemy): users, sessions, projects, tasks, leases, annotations,
the audit log.

Accounts: a user is never deleted (a removed one is renamed and disabled, so ids are never reused and their
annotations stay attributed); a session token is stored as its SHA-256 only, expires after `session_hours`, and is
checked against the database on every request, so removing, disabling or demoting a user takes effect at once.
A skip is the annotator's own: the task is never shown to them again and the skip does not fill an overlap slot.

SQLite by default (WAL mode, a file in the working folder), PostgreSQL when given a `postgresql://` URL. The
schema is created by the app and migrated forward by `MIGRATIONS` (its version lives in `schema_version`).
Handing out the next task is one transaction: the annotator's unexpired lease if any, else the first task with
fewer (annotations + live leases) than its overlap that the annotator has not touched. A task that has all its
annotations is marked `closed` in the transaction that adds the last one (an undo reopens it), so the search
reads open tasks only, through an index, however many are done.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from labeling_ui.validate import text_problem

ROLES = ("annotator", "reviewer", "admin")


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


SCHEMA_VERSION = 4
IMPORT_CHUNK = 500  # tasks per transaction of an import: other writers get the lock in between
# version -> (table, column, SQL type) added by that version; a database at version v gets every later step
MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [("leases", "created", "TIMESTAMP"), ("annotations", "seconds", "FLOAT")],
    3: [("tasks", "closed", "BOOLEAN NOT NULL DEFAULT FALSE")],
    4: [
        ("users", "disabled", "BOOLEAN NOT NULL DEFAULT FALSE"),
        ("users", "removed", "BOOLEAN NOT NULL DEFAULT FALSE"),
    ],
}
# version -> statements that fill what that version added from the data already there
BACKFILLS: dict[int, list[str]] = {
    3: [
        "UPDATE tasks SET closed = ((SELECT count(*) FROM annotations WHERE annotations.task_id = tasks.id)"
        " >= tasks.overlap)"
    ],
    4: [
        "DROP TABLE IF EXISTS tokens",  # tokens kept in clear, never expiring: every old session ends
        "UPDATE tasks SET closed = ((SELECT count(*) FROM annotations WHERE annotations.task_id = tasks.id"
        " AND NOT annotations.skipped) >= tasks.overlap)",  # skips no longer fill slots
    ],
}


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str] = mapped_column(String(300))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    removed: Mapped[bool] = mapped_column(Boolean, default=False)


class SessionToken(Base):
    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the token, never the token
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime)
    expires: Mapped[dt.datetime] = mapped_column(DateTime)


class AuditEntry(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    actor: Mapped[str] = mapped_column(String(200))  # a user name, or "cli" for the command line
    action: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")


class Member(Base):
    """Who may work on a project: annotators see, and reviewers review, only the projects they are members of."""

    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("project_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_open", "project_id", "closed", "id"),)  # `next` reads open tasks in order
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    prompt: Mapped[list] = mapped_column(JSON)
    responses: Mapped[list] = mapped_column(JSON)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    closed: Mapped[bool] = mapped_column(Boolean, default=False)  # has its `overlap` annotations


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    expires: Mapped[dt.datetime] = mapped_column(DateTime)
    created: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Annotation(Base):
    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    ranks: Mapped[list | None] = mapped_column(JSON, nullable=True)  # None for a skip
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    unsafe: Mapped[str | None] = mapped_column(String(100), nullable=True)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    rationale: Mapped[str] = mapped_column(Text, default="")
    strength: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=dt.datetime.utcnow)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # from lease to submission


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class Conflict(Exception):
    pass


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    def __init__(self, url: str = "sqlite:///labels.db", lease_seconds: int = 600, session_hours: float = 12) -> None:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")  # psycopg 3 is the driver we ship
        self.url = url
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.session_life = dt.timedelta(hours=session_hours)
        pool = {} if url.startswith("sqlite") else {"pool_size": 20, "max_overflow": 60}
        self.engine = create_engine(url, future=True, pool_pre_ping=True, **pool)
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
        self.migrate()

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
            row = s.scalar(select(SchemaVersion))
            version = row.version if row else (1 if existed else SCHEMA_VERSION)
            for step in sorted(v for v in MIGRATIONS if v > version):
                present = {
                    t: {c["name"] for c in inspect(s.connection()).get_columns(t)} for t, _, _ in MIGRATIONS[step]
                }
                for table, column, sql_type in MIGRATIONS[step]:
                    if column not in present[table]:
                        s.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
                for statement in BACKFILLS.get(step, []):
                    s.execute(text(statement))
                version = step
            for table in Base.metadata.sorted_tables:  # indexes of tables that existed before them
                for index in table.indexes:
                    index.create(s.connection(), checkfirst=True)
            if row is None:
                s.add(SchemaVersion(version=version))
            else:
                row.version = version
        return version

    # ------------------------------------------------------------------------------------------- accounts

    def add_user(self, name: str, role: str, password_hash: str, actor: str = "cli") -> int:
        if not name or not name.strip() or name != name.strip() or "#" in name or text_problem(name, "name", 150):
            raise ValueError(
                f"user name {name!r} must be non-blank, at most 150 characters, without surrounding spaces, '#' or"
                " control characters"
            )
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        with self._write() as s:
            if s.scalar(select(User).where(User.name == name)):
                raise Conflict(f"user {name!r} already exists")
            user = User(name=name, role=role, password_hash=password_hash, disabled=False, removed=False)
            s.add(user)
            s.flush()
            self._audit(s, actor, "user_add", {"user": name, "role": role})
            return user.id

    def user_by_name(self, name: str) -> User | None:
        """The user of that name, if it exists and is not removed (disabled users are returned: check `disabled`)."""
        with self.sessions() as s:
            return s.scalar(select(User).where(User.name == name, User.removed.is_(False)))

    def _account(self, s: Session, name: str) -> User:
        user = s.scalar(select(User).where(User.name == name, User.removed.is_(False)))
        if user is None:
            raise KeyError(f"no user {name!r}")
        return user

    def remove_user(self, name: str, actor: str = "cli") -> None:
        """Ends the user's sessions and frees the name; the row stays (renamed), so its id is never reused and its
        annotations stay in the exports."""
        with self._write() as s:
            user = self._account(s, name)
            user.removed, user.disabled, user.name = True, True, f"{name}#removed-{user.id}"
            s.execute(delete(SessionToken).where(SessionToken.user_id == user.id))
            s.execute(delete(Lease).where(Lease.user_id == user.id))
            self._audit(s, actor, "user_remove", {"user": name, "id": user.id})

    def set_role(self, name: str, role: str, actor: str = "cli") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        with self._write() as s:
            user = self._account(s, name)
            old, user.role = user.role, role
            s.execute(delete(SessionToken).where(SessionToken.user_id == user.id))
            self._audit(s, actor, "role_change", {"user": name, "from": old, "to": role})

    def set_password(self, name: str, password_hash: str, actor: str = "cli") -> None:
        with self._write() as s:
            user = self._account(s, name)
            user.password_hash = password_hash
            s.execute(delete(SessionToken).where(SessionToken.user_id == user.id))
            self._audit(s, actor, "password_change", {"user": name})

    def set_disabled(self, name: str, disabled: bool, actor: str = "cli") -> None:
        with self._write() as s:
            user = self._account(s, name)
            user.disabled = disabled
            if disabled:
                s.execute(delete(SessionToken).where(SessionToken.user_id == user.id))
            self._audit(s, actor, "user_disable" if disabled else "user_enable", {"user": name})

    def users(self) -> list[dict]:
        with self.sessions() as s:
            rows = s.scalars(select(User).where(User.removed.is_(False)).order_by(User.id)).all()
        return [{"id": u.id, "name": u.name, "role": u.role, "disabled": bool(u.disabled)} for u in rows]

    def new_token(self, user_id: int) -> str:
        """A new session for the user; only the token's hash is stored."""
        token = secrets.token_urlsafe(32)
        now = dt.datetime.utcnow()
        with self._write() as s:
            s.execute(delete(SessionToken).where(SessionToken.user_id == user_id, SessionToken.expires <= now))
            s.add(
                SessionToken(
                    token_hash=token_hash(token), user_id=user_id, created=now, expires=now + self.session_life
                )
            )
        return token

    def _sqlite_row(self, sql: str, params: tuple):
        """One row of a plain query on SQLite's own driver: the per-request lookups below, at a tenth of the ORM's
        cost (they run on the event loop for every request)."""
        con = self.engine.raw_connection()
        try:
            cur = con.cursor()
            cur.execute(sql, params)
            return cur.fetchone()
        finally:
            con.close()

    def user_by_token(self, token: str) -> User | None:
        """The token's user while the session is unexpired and the user active; read from the database on every
        request (one primary-key lookup), so no change to an account waits for a cache."""
        if self.serial_writes:
            row = self._sqlite_row(
                "SELECT users.id, users.name, users.role FROM sessions JOIN users ON users.id = sessions.user_id"
                " WHERE sessions.token_hash = ? AND sessions.expires > ? AND NOT users.disabled AND NOT users.removed",
                (token_hash(token), dt.datetime.utcnow().strftime("%Y-%m-%d %H:%M:%S.%f")),  # as SQLAlchemy stores it
            )
            return User(id=row[0], name=row[1], role=row[2], disabled=False, removed=False) if row else None
        with self.sessions() as s:
            return s.scalar(
                select(User)
                .join(SessionToken, SessionToken.user_id == User.id)
                .where(
                    SessionToken.token_hash == token_hash(token),
                    SessionToken.expires > dt.datetime.utcnow(),
                    User.disabled.is_(False),
                    User.removed.is_(False),
                )
            )

    def end_session(self, token: str) -> bool:
        with self._write() as s:
            return bool(s.execute(delete(SessionToken).where(SessionToken.token_hash == token_hash(token))).rowcount)

    # ------------------------------------------------------------------------------------------------- audit

    @staticmethod
    def _audit(s: Session, actor: str, action: str, detail: dict) -> None:
        s.add(AuditEntry(time=dt.datetime.utcnow(), actor=actor[:200], action=action, detail=detail))

    def audit(self, actor: str, action: str, **detail) -> None:
        with self._write() as s:
            self._audit(s, actor, action, detail)

    def audit_log(self, limit: int | None = None) -> list[dict]:
        with self.sessions() as s:
            q = select(AuditEntry).order_by(AuditEntry.id)
            rows = s.scalars(q if limit is None else q.limit(limit)).all()
        return [
            {"id": a.id, "time": a.time.isoformat() + "Z", "actor": a.actor, "action": a.action, **(a.detail or {})}
            for a in rows
        ]

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
        sqlite = self.url.startswith("sqlite")
        for _ in range(20):  # a concurrent annotator may win the same slot; try the next one
            now = now or dt.datetime.utcnow()
            try:
                with self._write() as s:
                    # a write first: on SQLite it takes the write lock, so what follows is read and written alone
                    s.query(Lease).filter(Lease.user_id == user_id, Lease.expires <= now).delete()
                    proj = s.scalar(select(Project).where(Project.name == project))
                    if proj is None:
                        return None
                    mine = s.scalar(
                        select(Task)
                        .join(Lease, Lease.task_id == Task.id)
                        .where(Lease.user_id == user_id, Task.project_id == proj.id)
                    )
                    if mine is not None:
                        return mine
                    done = select(Annotation.task_id).where(Annotation.user_id == user_id)
                    leased = select(Lease.task_id).where(Lease.user_id == user_id)
                    query = (
                        select(Task)
                        .where(
                            Task.project_id == proj.id,
                            Task.closed.is_(False),
                            Task.id.not_in(done),
                            Task.id.not_in(leased),
                            self._taken(now) < Task.overlap,
                        )
                        .order_by(Task.id)
                    )
                    if not sqlite:
                        query = query.with_for_update(skip_locked=True)
                    task = s.scalar(query.limit(1))
                    if task is None:
                        return None
                    # PostgreSQL: the count above may predate a lease committed before we locked the row; recount
                    if not sqlite and s.scalar(select(self._taken(now)).where(Task.id == task.id)) >= task.overlap:
                        raise _SlotTaken  # rolls this transaction back; try the next task
                    s.add(Lease(task_id=task.id, user_id=user_id, expires=now + self.lease, created=now))
                    return task
            except (IntegrityError, _SlotTaken):  # a unique lease violated, or the slot taken meanwhile
                continue
        raise Conflict("could not lease a task after 20 attempts")

    @staticmethod
    def _taken(now: dt.datetime):
        """Annotations plus live leases of the task in the enclosing query."""
        n_ann = select(func.count()).where(Annotation.task_id == Task.id, Annotation.skipped.is_(False))
        n_live = select(func.count()).where(Lease.task_id == Task.id, Lease.expires > now).scalar_subquery()
        return n_ann.scalar_subquery() + n_live

    def submit(self, task_id: int, user_id: int, check=None, **fields) -> int:
        """Store an annotation for a task the user holds a lease on; exactly once, in one transaction."""
        with self._write() as s:
            lease = s.scalar(select(Lease).where(Lease.task_id == task_id, Lease.user_id == user_id))
            released = s.execute(delete(Lease).where(Lease.task_id == task_id, Lease.user_id == user_id)).rowcount
            task = s.get(Task, task_id, with_for_update=not self.url.startswith("sqlite"))
            if task is None:
                raise KeyError(f"task {task_id} not found")
            if not released:
                raise Conflict(f"task {task_id} is not leased to you (request it with /api/tasks/next)")
            if check is not None:
                check(task)  # raises ValueError: what the annotation must match in its task (ranks, strength)
            skip = bool(fields.get("skipped"))
            count = s.scalar(select(func.count()).where(Annotation.task_id == task_id, Annotation.skipped.is_(False)))
            if not skip and count >= task.overlap:
                full = True  # commit the lease's release (an expired lease someone else's annotation filled)
            else:
                full = False
                task.closed = count + (0 if skip else 1) >= task.overlap  # a skip fills no slot
                seconds = (dt.datetime.utcnow() - lease.created).total_seconds() if lease and lease.created else None
                ann = Annotation(task_id=task_id, user_id=user_id, seconds=seconds, **fields)
                s.add(ann)
                s.flush()
        if full:
            raise Conflict(f"task {task_id} already has its {task.overlap} annotations")
        return ann.id

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

    def projects(self, user: User | None = None) -> list[str]:
        """Every project, or those `user` may see (all of them for an admin)."""
        with self.sessions() as s:
            q = select(Project.name).order_by(Project.id)
            if user is not None and user.role != "admin":
                q = q.join(Member, Member.project_id == Project.id).where(Member.user_id == user.id)
            return list(s.scalars(q))

    def may_see(self, project: str, user: User) -> bool:
        if user.role == "admin":
            return True
        if self.serial_writes:
            return (
                self._sqlite_row(
                    "SELECT 1 FROM members JOIN projects ON projects.id = members.project_id"
                    " WHERE projects.name = ? AND members.user_id = ?",
                    (project, user.id),
                )
                is not None
            )
        with self.sessions() as s:
            return (
                s.scalar(
                    select(Member.id)
                    .join(Project, Project.id == Member.project_id)
                    .where(Project.name == project, Member.user_id == user.id)
                )
                is not None
            )

    def add_members(self, project: str, names: list[str], actor: str = "cli") -> None:
        """Makes the users members of the project (created empty if it does not exist yet)."""
        with self._write() as s:
            proj = s.scalar(select(Project).where(Project.name == project))
            if proj is None:
                proj = Project(name=project, guidelines="")
                s.add(proj)
                s.flush()
            for name in names:
                user = self._account(s, name)
                if not s.scalar(select(Member.id).where(Member.project_id == proj.id, Member.user_id == user.id)):
                    s.add(Member(project_id=proj.id, user_id=user.id))
            self._audit(s, actor, "members_add", {"project": project, "users": names})

    def remove_member(self, project: str, name: str, actor: str = "cli") -> None:
        with self._write() as s:
            user = self._account(s, name)
            proj = s.scalar(select(Project).where(Project.name == project))
            gone = (
                proj is not None
                and s.execute(delete(Member).where(Member.project_id == proj.id, Member.user_id == user.id)).rowcount
            )
            if not gone:
                raise KeyError(f"{name!r} is not a member of project {project!r}")
            s.execute(
                delete(Lease).where(
                    Lease.user_id == user.id, Lease.task_id.in_(select(Task.id).where(Task.project_id == proj.id))
                )
            )
            self._audit(s, actor, "member_remove", {"project": project, "user": name})

    def members(self, project: str) -> list[str]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(User.name)
                    .join(Member, Member.user_id == User.id)
                    .join(Project, Project.id == Member.project_id)
                    .where(Project.name == project, User.removed.is_(False))
                    .order_by(User.name)
                )
            )

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
