"""Users, their sessions, project membership and the audit log: the accounts half of the labelling `Store`.

A user is never deleted (a removed one is renamed and disabled, so ids are never reused and their annotations stay
attributed); a session token is stored as its SHA-256 only, expires after the store's `session_life`, and is checked
against the database on every request, so removing, disabling or demoting a user takes effect at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from labeling_ui.schema import (
    IS_MEMBER,
    ROLES,
    SESSION_USER,
    AuditEntry,
    Lease,
    Member,
    Project,
    SessionToken,
    Task,
    User,
)
from labeling_ui.validate import text_problem


class Conflict(Exception):
    """The request contradicts what is stored (a name taken, a task not leased to you, a task already full)."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    """Methods of `Store` (which supplies `engine`, `sessions`, `_write()` and `session_life`) on accounts."""

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

    def user_by_token(self, token: str) -> User | None:
        """The token's user while the session is unexpired and the user active; read from the database on every
        request (one primary-key lookup), so no change to an account waits for a cache."""
        with self.engine.connect() as c:
            row = c.execute(SESSION_USER, {"token": token_hash(token), "now": dt.datetime.utcnow()}).first()
        return User(id=row.id, name=row.name, role=row.role, disabled=False, removed=False) if row else None

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

    def projects(self, user: User | None = None) -> list[str]:
        """Every project, or those `user` may see (all of them for an admin)."""
        with self.sessions() as s:
            q = select(Project.name).order_by(Project.id)
            if user is not None and user.role != "admin":
                q = q.join(Member, Member.project_id == Project.id).where(Member.user_id == user.id)
            return list(s.scalars(q))

    def may_see(self, project: str, user: User) -> bool:
        """An admin sees every project, anyone else those they are a member of (checked on every request)."""
        if user.role == "admin":
            return True
        with self.engine.connect() as c:
            return c.execute(IS_MEMBER, {"project": project, "user": user.id}).first() is not None

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
