"""Server-side sign-in sessions and password-guessing limits (pure: no I/O, injected clock).

Used by the pages' front (``dashboards.front``). A session is a random 256-bit token in
an HttpOnly cookie; the server keeps only its SHA-256, the user, and a fingerprint of the
user's password hash at sign-in. A session ends when:

- the user signs out (``SessionStore.end``), or changes their password (``end_user``);
- nothing was done with it for ``idle_s`` seconds, or it is older than ``absolute_s``;
- the users file no longer has the user, marks them disabled, or holds another password
  hash for them (``lastmile users remove/disable/add``): checked on every request by
  ``still_valid``, so a copied cookie stops working at once in all these cases.

``SigninLimiter`` counts failed sign-ins per user name and per client address in a
sliding window (OWASP Authentication Cheat Sheet, "Account lockout" / throttling): once
a name or an address reaches its limit, further attempts are refused without checking
the password until the oldest failure leaves the window.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dashboards.review.auth import User

Clock = Callable[[], float]


def fingerprint(user: User) -> str:
    """A short digest of the user's stored password hash (and disabled flag): when either
    changes, sessions made before no longer match."""
    raw = f"{user.password_hash or ''}|{int(user.disabled)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    user: str
    fingerprint: str
    address: str
    created: float
    last_seen: float
    csrf: str  # per-session token the front's own forms (sign-out, password) must echo

    def csrf_ok(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(self.csrf, value or "")


@dataclass
class SessionStore:
    """Sessions by token digest. ``idle_s``: ended after this long without a request;
    ``absolute_s``: ended this long after sign-in whatever the activity."""

    idle_s: float = 900.0
    absolute_s: float = 12 * 3600.0
    clock: Clock = time.monotonic
    _by_key: dict[str, Session] = field(default_factory=dict)

    def create(self, user: User, address: str) -> tuple[str, Session]:
        """A new session for ``user``; returns the token for the cookie (shown once)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        s = Session(user.name, fingerprint(user), address, now, now, secrets.token_urlsafe(24))
        self._by_key[_key(token)] = s
        self._sweep(now)
        return token, s

    def get(self, token: str | None, *, touch: bool = True) -> Session | None:
        """The live session of ``token``, its idle clock reset (unless ``touch`` is False);
        None when unknown, idle too long or too old (and then forgotten)."""
        if not token:
            return None
        key = _key(token)
        s = self._by_key.get(key)
        if s is None:
            return None
        now = self.clock()
        if now - s.last_seen > self.idle_s or now - s.created > self.absolute_s:
            del self._by_key[key]
            return None
        if touch:
            s.last_seen = now
        return s

    def end(self, token: str | None) -> Session | None:
        return self._by_key.pop(_key(token), None) if token else None

    def end_user(self, name: str, keep: str | None = None) -> int:
        """End every session of ``name`` (except the one of token ``keep``); how many."""
        keep_key = _key(keep) if keep else None
        gone = [k for k, s in self._by_key.items() if s.user == name and k != keep_key]
        for k in gone:
            del self._by_key[k]
        return len(gone)

    def __len__(self) -> int:
        return len(self._by_key)

    def _sweep(self, now: float) -> None:
        for k in [k for k, s in self._by_key.items()
                  if now - s.last_seen > self.idle_s or now - s.created > self.absolute_s]:
            del self._by_key[k]


def still_valid(session: Session, user: User | None) -> bool:
    """True while the users file still has this user, enabled, with the same password."""
    return user is not None and not user.disabled and \
        hmac.compare_digest(fingerprint(user), session.fingerprint)


@dataclass(frozen=True)
class Limited:
    """Sign-in refused for a while: by user name or by address."""

    scope: str  # "user" or "address"
    failures: int
    retry_after_s: float


@dataclass
class SigninLimiter:
    """Failed sign-ins per user name and per address in a sliding window of ``window_s``."""

    per_user: int = 10
    per_address: int = 30
    window_s: float = 900.0
    clock: Clock = time.monotonic
    max_keys: int = 100_000  # names and addresses kept; past this, expired ones are dropped
    _users: dict[str, deque[float]] = field(default_factory=dict)
    _addresses: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, table: dict[str, deque[float]], key: str, now: float) -> deque[float]:
        q = table.setdefault(key, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        if not q:
            del table[key]
            return deque()
        return q

    def check(self, name: str, address: str) -> Limited | None:
        """Whether an attempt for ``name`` from ``address`` may be checked now."""
        now = self.clock()
        for scope, table, key, limit in (("address", self._addresses, address, self.per_address),
                                         ("user", self._users, name.strip().lower(),
                                          self.per_user)):
            q = self._recent(table, key, now)
            if len(q) >= limit:
                return Limited(scope, len(q), round(q[0] + self.window_s - now, 1))
        return None

    def failed(self, name: str, address: str) -> tuple[int, int]:
        """Record a failure; returns the failures now in the window (per user, per address)."""
        now = self.clock()
        for table in (self._users, self._addresses):  # many names tried: forget expired ones
            if len(table) >= self.max_keys:
                for key in list(table):
                    self._recent(table, key, now)
        u = self._users.setdefault(name.strip().lower(), deque())
        a = self._addresses.setdefault(address, deque())
        u.append(now)
        a.append(now)
        return len(self._recent(self._users, name.strip().lower(), now)), \
            len(self._recent(self._addresses, address, now))

    def succeeded(self, name: str) -> None:
        """A correct password clears the name's failures (not the address's)."""
        self._users.pop(name.strip().lower(), None)
