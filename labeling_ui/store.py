"""The one module that talks to the database (SQLAlchemy): users, tokens, projects, tasks, leases, annotations.

SQLite by default (WAL mode, a file in the working folder), PostgreSQL when given a `postgresql://` URL. The
schema is created by the app and migrated forward by `MIGRATIONS` (its version lives in `schema_version`).
Handing out the next task is one transaction: the annotator's unexpired lease if any, else the first task with
fewer (annotations + live leases) than its overlap that the annotator has not touched. A task that has all its
annotations is marked `closed` in the transaction that adds the last one (an undo reopens it), so the search
reads open tasks only, through an index, however many are done.
"""

from __future__ import annotations

import contextlib
import datetime as dt
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
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

ROLES = ("annotator", "reviewer", "admin")


class _SlotTaken(Exception):
    """A task's last free slot went to another annotator between our count and our lock (PostgreSQL)."""


SCHEMA_VERSION = 3
TOKEN_CACHE_SECONDS = 60.0
# version -> (table, column, SQL type) added by that version; a database at version v gets every later step
MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [("leases", "created", "TIMESTAMP"), ("annotations", "seconds", "FLOAT")],
    3: [("tasks", "closed", "BOOLEAN NOT NULL DEFAULT FALSE")],
}
# version -> statements that fill what that version added from the data already there
BACKFILLS: dict[int, list[str]] = {
    3: [
        "UPDATE tasks SET closed = ((SELECT count(*) FROM annotations WHERE annotations.task_id = tasks.id)"
        " >= tasks.overlap)"
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


class Token(Base):
    __tablename__ = "tokens"
    token: Mapped[str] = mapped_column(String(100), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=dt.datetime.utcnow)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")


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


class Store:
    def __init__(self, url: str = "sqlite:///labels.db", lease_seconds: int = 600) -> None:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")  # psycopg 3 is the driver we ship
        self.url = url
        self.lease = dt.timedelta(seconds=lease_seconds)
        pool = {} if url.startswith("sqlite") else {"pool_size": 20, "max_overflow": 60}
        self.engine = create_engine(url, future=True, pool_pre_ping=True, **pool)
        if url.startswith("sqlite"):

            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _):
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")  # an acknowledged annotation survives a kill
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._token_users: dict[str, tuple[User, float]] = {}  # token -> (user, monotonic time it is good until)
        # SQLite has one writer at a time. Writers of this process queue on a lock and start the moment the last one
        # commits; left to SQLite's busy handler they would poll with sleeps of up to 100 ms (the p99 of a busy
        # server). Other processes writing the same file still wait through busy_timeout.
        self.serial_writes = url.startswith("sqlite")
        self._write_lock = threading.Lock() if self.serial_writes else contextlib.nullcontext()
        self.migrate()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """A read-write transaction, committed on leaving the block (rolled back on an exception)."""
        with self._write_lock, self.sessions.begin() as s:
            yield s

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

    def add_user(self, name: str, role: str, password_hash: str) -> int:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        with self._write() as s:
            if s.scalar(select(User).where(User.name == name)):
                raise Conflict(f"user {name!r} already exists")
            user = User(name=name, role=role, password_hash=password_hash)
            s.add(user)
            s.flush()
            return user.id

    def user_by_name(self, name: str) -> User | None:
        with self.sessions() as s:
            return s.scalar(select(User).where(User.name == name))

    def new_token(self, user_id: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._write() as s:
            s.add(Token(token=token, user_id=user_id))
        return token

    def user_by_token(self, token: str) -> User | None:
        """The token's user. Every API request asks, so a found user is remembered for TOKEN_CACHE_SECONDS (tokens
        and roles never change once written; the bound is for a user removed from the database by hand)."""
        hit = self._token_users.get(token)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        with self.sessions() as s:
            user = s.scalar(select(User).join(Token, Token.user_id == User.id).where(Token.token == token))
        if user is not None:
            self._token_users[token] = (user, time.monotonic() + TOKEN_CACHE_SECONDS)
        return user

    # ------------------------------------------------------------------------------------- projects/tasks

    def import_tasks(self, project: str, items: list[dict], overlap: int, guidelines: str | None = None) -> int:
        """All or nothing: one transaction."""
        with self._write() as s:
            proj = s.scalar(select(Project).where(Project.name == project))
            if proj is None:
                proj = Project(name=project, guidelines=guidelines or "")
                s.add(proj)
                s.flush()
            elif guidelines is not None:
                proj.guidelines = guidelines
            for item in items:
                s.add(
                    Task(
                        project_id=proj.id,
                        prompt=item["prompt"],
                        responses=item["responses"],
                        tags=item.get("tags") or [],
                        meta=item.get("meta") or {},
                        overlap=overlap,
                    )
                )
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
        n_ann = select(func.count()).where(Annotation.task_id == Task.id).scalar_subquery()
        n_live = select(func.count()).where(Lease.task_id == Task.id, Lease.expires > now).scalar_subquery()
        return n_ann + n_live

    def submit(self, task_id: int, user_id: int, expected_k: bool = False, **fields) -> int:
        """Store an annotation for a task the user holds a lease on; exactly once, in one transaction."""
        with self._write() as s:
            lease = s.scalar(select(Lease).where(Lease.task_id == task_id, Lease.user_id == user_id))
            released = s.execute(delete(Lease).where(Lease.task_id == task_id, Lease.user_id == user_id)).rowcount
            task = s.get(Task, task_id, with_for_update=not self.url.startswith("sqlite"))
            if task is None:
                raise KeyError(f"task {task_id} not found")
            if not released:
                raise Conflict(f"task {task_id} is not leased to you (request it with /api/tasks/next)")
            if expected_k and fields.get("ranks") is not None and len(fields["ranks"]) != len(task.responses):
                raise ValueError(
                    f"task {task_id} has {len(task.responses)} responses; got {len(fields['ranks'])} ranks"
                )
            count = s.scalar(select(func.count()).where(Annotation.task_id == task_id))
            if count >= task.overlap:
                full = True  # commit the lease's release (an expired lease someone else's annotation filled)
            else:
                full = False
                task.closed = count + 1 >= task.overlap
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
            s.get(Task, task_id).closed = False  # one annotation short of its overlap again
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
            n_ann = select(func.count()).where(Annotation.task_id == Task.id).scalar_subquery()
            open_for_me = s.scalar(
                select(func.count())
                .select_from(Task)
                .where(
                    Task.project_id == proj.id,
                    n_ann < Task.overlap,
                    Task.id.not_in(select(Annotation.task_id).where(Annotation.user_id == user_id)),
                )
            )
            done = s.scalar(select(func.count()).select_from(Annotation).where(Annotation.task_id.in_(in_proj)))
            total = s.scalar(select(func.coalesce(func.sum(Task.overlap), 0)).where(Task.project_id == proj.id))
        return {"mine_done": mine, "mine_remaining": open_for_me, "project_done": done, "project_total": int(total)}

    def projects(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Project.name).order_by(Project.id)))

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
