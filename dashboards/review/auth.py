"""Who may use the pages: users, roles and password hashes (pure, plus the users file).

Users live in a TOML file (``LASTMILE_USERS_FILE``, default ``<state_dir>/users.toml``,
written with mode 0600)::

    [users.dr_a]
    roles = ["reader"]
    pipelines = ["hfd", "bts"]
    password = "scrypt$16384$8$1$<salt hex>$<hash hex>"
    disabled = false    # true: may not sign in; their open sessions end

Passwords are stored only as scrypt hashes (stdlib ``hashlib.scrypt``, a random 16-byte
salt per user) and compared in constant time (``hmac.compare_digest``). A reader's
``pipelines`` decide which cases reach their worklist; an empty list means every pipeline.
A new password must pass ``check_strength`` (length and the zxcvbn estimate of how long it
takes to guess, as NIST SP 800-63B recommends instead of composition rules).
Sessions are kept by the pages' front (``dashboards.review.sessions``), never in a token
the browser could replay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AuthError(Exception):
    """A users file or a sign-in problem, with what to do about it."""


class Role(StrEnum):
    """What a person may do. ``admin`` may do everything."""

    READER = "reader"
    QC = "qc"
    GOVERNANCE = "governance"
    ADMIN = "admin"


@dataclass(frozen=True)
class User:
    name: str
    roles: frozenset[Role]
    pipelines: tuple[str, ...] = ()  # empty: every pipeline
    password_hash: str | None = None  # None: only via the trusted proxy header
    disabled: bool = False  # may not sign in (``lastmile users disable``)

    def has(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles

    def reads(self, pipeline: str | None) -> bool:
        """True when this user reads (or QCs) cases of ``pipeline``."""
        return not self.pipelines or pipeline in self.pipelines


@dataclass(frozen=True)
class Users:
    by_name: Mapping[str, User] = field(default_factory=dict)

    def get(self, name: str) -> User | None:
        return self.by_name.get(name)

    def readers_of(self, pipeline: str) -> list[str]:
        """Every user with the reader role for ``pipeline``, sorted (assignment order)."""
        return sorted(u.name for u in self.by_name.values()
                      if Role.READER in u.roles and u.reads(pipeline))

    def __len__(self) -> int:
        return len(self.by_name)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """An scrypt hash string ``scrypt$N$r$p$salt$hash`` (parameters travel with it)."""
    if not password:
        raise AuthError("a password may not be empty")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check of ``password`` against a stored hash; False for any malformed
    hash (a broken entry must never let someone in)."""
    if not stored or not password:
        return False
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(hash_hex)
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=int(n),
                             r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def authenticate(users: Users, name: str, password: str) -> User | None:
    """The user if the password matches. An unknown name costs the same hash work as a
    known one, so timing does not tell which names exist."""
    user = users.get(name.strip())
    if user is None:
        verify_password(password, _DUMMY_HASH)
        return None
    ok = verify_password(password, user.password_hash)
    return user if ok and not user.disabled else None


_DUMMY_HASH = "scrypt$16384$8$1$" + "00" * 16 + "$" + "00" * 32

MIN_PASSWORD_LENGTH = 12
MIN_PASSWORD_SCORE = 3  # zxcvbn: 3 = "safely unguessable: moderate protection from offline
# slow-hash scenario" (about 10^8 guesses and more)


def check_strength(password: str, name: str = "") -> None:
    """Refuse a weak password with the reason and a hint: shorter than
    ``MIN_PASSWORD_LENGTH`` characters, or a zxcvbn score below ``MIN_PASSWORD_SCORE``
    (dictionary words, names, keyboard patterns, the user's own name).

    Raises ``AuthError``."""
    from zxcvbn import zxcvbn

    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} "
                        "characters (a few unrelated words work well)")
    result = zxcvbn(password[:100], user_inputs=[name, *name.replace(".", " ").split(),
                                                  "lastmile"])
    if int(result["score"]) < MIN_PASSWORD_SCORE:
        hint = (result.get("feedback") or {}).get("warning") or "it is easy to guess"
        raise AuthError(f"the password is too weak ({str(hint).rstrip('.')}): add words or "
                        "characters that are not a common pattern")


def parse_roles(values: Iterable[str]) -> frozenset[Role]:
    roles = set()
    for v in values:
        try:
            roles.add(Role(v.strip().lower()))
        except ValueError:
            raise AuthError(f"unknown role {v!r}; choose from "
                            f"{', '.join(r.value for r in Role)}") from None
    if not roles:
        raise AuthError("a user needs at least one role")
    return frozenset(roles)


def parse_users(text: str, source: str = "users file") -> Users:
    """Users from TOML text; a malformed entry is refused with its name."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthError(f"{source}: {exc}") from None
    table = data.get("users", {})
    if not isinstance(table, dict) or set(data) - {"users"}:
        raise AuthError(f"{source}: only [users.<name>] tables are allowed")
    out: dict[str, User] = {}
    for name, entry in table.items():
        if not NAME.match(name) or not isinstance(entry, dict):
            raise AuthError(f"{source}: user {name!r} is not a valid entry")
        unknown = set(entry) - {"roles", "pipelines", "password", "disabled"}
        if unknown:
            raise AuthError(f"{source}: user {name!r} has unknown keys {sorted(unknown)}")
        roles = entry.get("roles", [])
        pipelines = entry.get("pipelines", [])
        pw = entry.get("password")
        if not isinstance(roles, list) or not isinstance(pipelines, list) or \
                (pw is not None and not isinstance(pw, str)):
            raise AuthError(f"{source}: user {name!r}: roles and pipelines are lists, "
                            "password a string")
        disabled = entry.get("disabled", False)
        if not isinstance(disabled, bool):
            raise AuthError(f"{source}: user {name!r}: disabled is true or false")
        out[name] = User(name, parse_roles(roles), tuple(str(p) for p in pipelines), pw,
                         disabled)
    return Users(out)


def load_users(path: Path) -> Users:
    """The users file, or no users if it does not exist; a file others can read is
    refused (it holds password hashes)."""
    if not path.exists():
        return Users()
    if path.stat().st_mode & 0o077:
        raise AuthError(f"{path} is readable by other users; run chmod 600 {path}")
    return parse_users(path.read_text(encoding="utf-8"), str(path))


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string of printable text is a valid TOML basic string


def dump_users(users: Users) -> str:
    lines = ["# Lastmile users: written by `lastmile users add`; passwords are scrypt hashes", ""]
    for name in sorted(users.by_name):
        u = users.by_name[name]
        lines.append(f"[users.{_toml_str(name)}]")
        lines.append(f"roles = [{', '.join(_toml_str(r.value) for r in sorted(u.roles))}]")
        lines.append(f"pipelines = [{', '.join(_toml_str(p) for p in u.pipelines)}]")
        if u.password_hash:
            lines.append(f"password = {_toml_str(u.password_hash)}")
        if u.disabled:
            lines.append("disabled = true")
        lines.append("")
    return "\n".join(lines)


def save_users(path: Path, users: Users) -> None:
    """Write the file atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dump_users(users))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def with_user(users: Users, user: User) -> Users:
    return Users({**users.by_name, user.name: user})


def without_user(users: Users, name: str) -> Users:
    return Users({k: v for k, v in users.by_name.items() if k != name})
