"""The labelling database's tables, their migrations, and the statements of the hot path (`next`, `submit`).

Tables are SQLAlchemy ORM classes; the schema's version lives in `schema_version` and `migrate` brings an older
database forward. The statements that run for every annotation are plain SQL compiled once, valid on SQLite and
PostgreSQL alike (`*_LOCKED` add PostgreSQL's row locks): building the equivalent ORM queries cost three times the
queries themselves, on the event loop that serves every request.
"""

from __future__ import annotations

import datetime as dt

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
    bindparam,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

ROLES = ("annotator", "reviewer", "admin")


SCHEMA_VERSION = 4
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


class TaxonomyWorkspace(Base):
    """A built taxonomy under review: what the build recorded beside it (merges with their evidence, placements,
    example prompts and counts per raw tag), fixed at import; its tags live in `taxonomy_versions`."""

    __tablename__ = "taxonomies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime)
    merges: Mapped[list] = mapped_column(JSON, default=list)
    placements: Mapped[list] = mapped_column(JSON, default=list)
    examples: Mapped[dict] = mapped_column(JSON, default=dict)  # raw tag -> a few prompts tagged with it
    counts: Mapped[dict] = mapped_column(JSON, default=dict)  # raw tag -> prompts tagged with it


class TaxonomyVersion(Base):
    """Every state of a taxonomy: version 1 as imported, then one per reviewer edit (who, when, what)."""

    __tablename__ = "taxonomy_versions"
    __table_args__ = (UniqueConstraint("taxonomy_id", "version"),)  # two edits from the same version: one wins
    id: Mapped[int] = mapped_column(primary_key=True)
    taxonomy_id: Mapped[int] = mapped_column(ForeignKey("taxonomies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    created: Mapped[dt.datetime] = mapped_column(DateTime)
    author: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    tags: Mapped[list] = mapped_column(JSON)  # the taxonomy file's `tags` list


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


def migrate(s: Session, existed: bool) -> int:
    """Adds what each schema version after the database's added (all tables exist already); returns the version
    reached. `existed`: the database had tables before this process created the missing ones."""
    row = s.scalar(select(SchemaVersion))
    version = row.version if row else (1 if existed else SCHEMA_VERSION)
    for step in sorted(v for v in MIGRATIONS if v > version):
        present = {t: {c["name"] for c in inspect(s.connection()).get_columns(t)} for t, _, _ in MIGRATIONS[step]}
        for table, column, sql_type in MIGRATIONS[step]:
            if column not in present[table]:
                s.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
        for backfill in BACKFILLS.get(step, []):
            s.execute(text(backfill))
        version = step
    for table in Base.metadata.sorted_tables:  # indexes of tables that existed before them
        for index in table.indexes:
            index.create(s.connection(), checkfirst=True)
    if row is None:
        s.add(SchemaVersion(version=version))
    else:
        row.version = version
    return version


def statement(sql: str, columns: dict | None = None, **types):
    """A plain statement with typed parameters and result columns: SQLAlchemy converts datetimes, booleans and
    JSON for the dialect, and compiles it once."""
    clause = text(sql).bindparams(*(bindparam(name, type_=t) for name, t in types.items()))
    return clause.columns(**columns) if columns else clause


TASK_COLUMNS = "tasks.id, tasks.prompt, tasks.responses, tasks.tags, tasks.overlap, tasks.closed"
TASK_TYPES = {"id": Integer, "prompt": JSON, "responses": JSON, "tags": JSON, "overlap": Integer, "closed": Boolean}
# annotations that fill a slot plus live leases, of the task `tasks.id`
TAKEN_SQL = (
    "(SELECT count(*) FROM annotations WHERE annotations.task_id = tasks.id AND annotations.skipped = false)"
    " + (SELECT count(*) FROM leases WHERE leases.task_id = tasks.id AND leases.expires > :now)"
)
NEXT_SQL = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE tasks.project_id = :project AND tasks.closed = false"
    " AND tasks.id NOT IN (SELECT task_id FROM annotations WHERE user_id = :user)"
    " AND tasks.id NOT IN (SELECT task_id FROM leases WHERE user_id = :user)"
    f" AND {TAKEN_SQL} < tasks.overlap ORDER BY tasks.id LIMIT 1"
)
NEXT_TASK = statement(NEXT_SQL, TASK_TYPES, now=DateTime())
NEXT_TASK_LOCKED = statement(NEXT_SQL + " FOR UPDATE SKIP LOCKED", TASK_TYPES, now=DateTime())  # PostgreSQL
TAKEN = statement(f"SELECT {TAKEN_SQL} FROM tasks WHERE tasks.id = :task", now=DateTime())
DROP_EXPIRED_LEASES = statement("DELETE FROM leases WHERE user_id = :user AND expires <= :now", now=DateTime())
PROJECT_ID = statement("SELECT id FROM projects WHERE name = :name")
HELD_TASK = statement(
    f"SELECT {TASK_COLUMNS} FROM tasks JOIN leases ON leases.task_id = tasks.id"
    " WHERE leases.user_id = :user AND tasks.project_id = :project",
    TASK_TYPES,
)
NEW_LEASE = statement(
    "INSERT INTO leases (task_id, user_id, expires, created) VALUES (:task, :user, :expires, :created)",
    expires=DateTime(),
    created=DateTime(),
)
LEASE_CREATED = statement("SELECT created FROM leases WHERE task_id = :task AND user_id = :user", {"created": DateTime})
RELEASE_LEASE = statement("DELETE FROM leases WHERE task_id = :task AND user_id = :user")
TASK = statement(f"SELECT {TASK_COLUMNS} FROM tasks WHERE tasks.id = :task", TASK_TYPES)
TASK_LOCKED = statement(f"SELECT {TASK_COLUMNS} FROM tasks WHERE tasks.id = :task FOR UPDATE", TASK_TYPES)
FILLED = statement("SELECT count(*) FROM annotations WHERE task_id = :task AND skipped = false")
SET_CLOSED = statement("UPDATE tasks SET closed = :closed WHERE id = :task", closed=Boolean())

SESSION_USER = statement(
    "SELECT users.id, users.name, users.role FROM sessions JOIN users ON users.id = sessions.user_id"
    " WHERE sessions.token_hash = :token AND sessions.expires > :now AND users.disabled = false"
    " AND users.removed = false",
    now=DateTime(),
)
IS_MEMBER = statement(
    "SELECT 1 FROM members JOIN projects ON projects.id = members.project_id"
    " WHERE projects.name = :project AND members.user_id = :user"
)


def task_from_row(row) -> Task:
    """A task row as a (detached) Task."""
    return Task(
        id=row.id, prompt=row.prompt, responses=row.responses, tags=row.tags, overlap=row.overlap, closed=row.closed
    )
