"""Salted scrypt password hashes (never stored or logged in clear), constant-work login checks, login throttling."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time

N, R, P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"scrypt${N}${R}${P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


# verified when the user name is unknown, so that an unknown name costs the same scrypt work as a wrong password
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def check_login(password: str, stored: str | None) -> bool:
    """The password against the stored hash, with the same work whether or not the user exists."""
    ok = verify_password(password, stored if stored is not None else _DUMMY_HASH)
    return ok and stored is not None


class LoginThrottle:
    """Exponential back-off of failed logins, per user name and per client address: the first `free` failures of a
    key cost nothing, each later one doubles that key's wait (from `base` seconds, at most `cap`). A login inside
    a wait is refused without being tried (HTTP 429 with Retry-After) and does not lengthen it; a success clears
    the user name's count. In memory, per server process, and bounded: a key is forgotten `forget` seconds after its
    last failure, and past `max_keys` keys (a spray of made-up names) the ones that failed longest ago go first."""

    def __init__(
        self, free: int = 5, base: float = 1.0, cap: float = 300.0, forget: float = 3600.0, max_keys: int = 100_000
    ) -> None:
        self.free, self.base, self.cap, self.forget, self.max_keys = free, base, cap, forget, max_keys
        # key -> (failures, monotonic time before which to refuse, monotonic time of the last failure)
        self._state: dict[str, tuple[int, float, float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login with these keys may be tried (0: now)."""
        now = time.monotonic()
        with self._lock:
            return max([0.0] + [self._state[k][1] - now for k in keys if k in self._state])

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                n, _, last = self._state.get(k, (0, 0.0, now))
                n = 1 if now - last > self.forget else n + 1
                wait = 0.0 if n <= self.free else min(self.base * 2 ** (n - self.free - 1), self.cap)
                self._state[k] = (n, now + wait, now)
            if len(self._state) > self.max_keys:
                self._prune(now)

    def _prune(self, now: float) -> None:
        """Drops forgotten keys, then (still too many) the oldest failures, down to 90% of `max_keys`."""
        self._state = {k: v for k, v in self._state.items() if now - v[2] <= self.forget}
        if len(self._state) > self.max_keys:
            keep = sorted(self._state.items(), key=lambda kv: kv[1][2])[-int(self.max_keys * 0.9) :]
            self._state = dict(keep)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._state.pop(k, None)
