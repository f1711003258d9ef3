"""Who may do what on the event log: one NATS user per service, least permissions.

The embedded server always requires credentials. They are generated at first start
into an owner-only JSON file in the state directory (``nats-credentials.json``, mode
0600): one user and a random 256-bit password per *role*. The server's configuration
gets an ``authorization`` block (NATS "users with permissions", see
https://docs.nats.io/running-a-nats-service/configuration/securing_nats/authorization)
in which each role may publish only the subjects of the facts it makes:

=========  ==============================================  ==============================
role       may publish events (``lm.ev.<study>.<type>``)   runs
=========  ==============================================  ==============================
admin      everything, and every JetStream API              the CLI, the supervisor (the
           (stream create/update, message delete)          stream), ``lastmile redact``
ingest     ``ingest.>``                                    DICOM receiver, completion
engine     ``engine.>``                                    workers, edits, PACS redelivery
projector  ``projections.>`` (drift alerts)                the DuckDB projector
pages      ``review.>`` (reads, QC, edits, sign-ins)       the Streamlit pages
review     ``review.case.>``                               the case assigner
xnat       ``engine.result.>``, ``review.review.>``,       XNAT publisher and feedback
           ``review.edit.>``
=========  ==============================================  ==============================

Every role may read the whole log (create, read, acknowledge and delete consumers on
the stream, except the other roles' durable consumers, ``ROLE_DURABLES``; get a stored
message by sequence or next-by-subject) and publish
``system.delivery.failed`` (the dead letters every consumer
writes). No role but admin may create, change, purge or delete the stream or delete
a message. So a stolen pages credential can write reviews but no engine or ingest
facts, and a process without a credential cannot connect at all.

The permission sets are written against the JetStream API subjects that nats-py
2.x uses with a nats-server >= 2.9 (``$JS.API.CONSUMER.CREATE.<stream>.<name>[.<filter>]``,
``$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>``, ``$JS.ACK.<stream>.>``).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from events.subjects import PREFIX

CREDENTIALS_FILE = "nats-credentials.json"

#: role -> the event-type prefixes (``<area>.<...>``) it may publish
ROLE_EVENTS: Mapping[str, tuple[str, ...]] = {
    "admin": (">",),
    "ingest": ("ingest.>",),
    "engine": ("engine.>",),
    "projector": ("projections.>",),
    "pages": ("review.>",),
    "review": ("review.case.>",),
    "xnat": ("engine.result.>", "review.review.>", "review.edit.>"),
}
ROLES: tuple[str, ...] = tuple(ROLE_EVENTS)
#: role -> the durable consumers it runs (the services' default names); every other role
#: is denied them, so a stolen credential cannot pull or acknowledge another service's
#: work away
ROLE_DURABLES: Mapping[str, tuple[str, ...]] = {
    "ingest": ("ingest-completion",),
    "engine": ("engine-workers", "engine-edits", "pacs-redelivery"),
    "review": ("review-assigner",),
    "xnat": ("xnat-publisher",),
}
DEAD_LETTER_TYPE = "system.delivery.failed"


class CredentialsError(Exception):
    """The credentials file is missing a role, unreadable, or readable by others."""


@dataclass(frozen=True)
class NatsUser:
    user: str
    password: str


@dataclass(frozen=True)
class NatsCredentials:
    """One NATS user per role (``ROLES``)."""

    users: Mapping[str, NatsUser]

    def for_role(self, role: str) -> NatsUser:
        try:
            return self.users[role]
        except KeyError:
            raise CredentialsError(
                f"no NATS credentials for role {role!r} (roles: {', '.join(sorted(self.users))})"
            ) from None

    @classmethod
    def generate(cls) -> NatsCredentials:
        return cls({role: NatsUser(f"lastmile-{role}", secrets.token_urlsafe(32))
                    for role in ROLES})

    def to_json(self) -> str:
        return json.dumps({"version": 1, "users": {
            role: {"user": u.user, "password": u.password} for role, u in self.users.items()}},
            indent=1)

    @classmethod
    def read(cls, path: Path) -> NatsCredentials:
        """Read ``path``; refuse it when group or others may read it (like ssh keys)."""
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise CredentialsError(
                f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}` "
                "and rotate the NATS credentials (docs/operations.md, Security)")
        try:
            data = json.loads(path.read_text())
            users = {role: NatsUser(str(v["user"]), str(v["password"]))
                     for role, v in data["users"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CredentialsError(f"{path}: not a Lastmile NATS credentials file ({exc!r})"
                                   ) from None
        return cls(users)


def load_or_create(path: Path) -> NatsCredentials:
    """The credentials in ``path``, generated (mode 0600, never overwritten) if absent."""
    if not path.exists():
        creds = NatsCredentials.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return NatsCredentials.read(path)
        with os.fdopen(fd, "w") as f:
            f.write(creds.to_json())
            f.flush()
            os.fsync(f.fileno())
        return creds
    return NatsCredentials.read(path)


def role_permissions(role: str, stream: str = "LASTMILE") -> dict[str, dict[str, list[str]]]:
    """The NATS ``permissions`` of a role (publish/subscribe allow lists, and a publish
    deny list of the other roles' durable consumers)."""
    if role not in ROLE_EVENTS:
        raise CredentialsError(f"unknown role {role!r}")
    if role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    api = "$JS.API"
    publish = [f"{PREFIX}.*.{types}" for types in ROLE_EVENTS[role]]
    publish += [
        f"{PREFIX}.*.{DEAD_LETTER_TYPE}",
        f"{api}.INFO",
        f"{api}.STREAM.INFO.{stream}",
        # where the next matching message is (a read's end is decided from the store)
        f"{api}.STREAM.MSG.GET.{stream}",
        # consumers: ephemeral readers (audit, projector), deleted when a read ends, and
        # the role's durables
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.*",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*",
        f"$JS.ACK.{stream}.>",
    ]
    deny = []
    for other, durables in ROLE_DURABLES.items():
        if other == role:
            continue
        for d in durables:
            deny += [f"{api}.CONSUMER.CREATE.{stream}.{d}",
                     f"{api}.CONSUMER.CREATE.{stream}.{d}.>",
                     f"{api}.CONSUMER.MSG.NEXT.{stream}.{d}",
                     f"{api}.CONSUMER.DELETE.{stream}.{d}",
                     f"$JS.ACK.{stream}.{d}.>"]
    return {"publish": {"allow": publish, "deny": deny}, "subscribe": {"allow": ["_INBOX.>"]}}


def _quote(text: str) -> str:
    return json.dumps(text)  # a NATS config string literal is JSON-compatible


def authorization_block(creds: NatsCredentials, stream: str = "LASTMILE") -> str:
    """The ``authorization { users = [...] }`` block of nats.conf for ``creds``.

    Also what a site pastes into an external server's configuration (the users and
    permissions are the same; ``lastmile security nats-config`` prints it).
    """
    lines = ["authorization {", "  users = ["]
    for role, u in creds.users.items():
        perms = role_permissions(role, stream)
        lines.append(f"    {{ user: {_quote(u.user)}, password: {_quote(u.password)},")
        lines.append(f"      permissions: {json.dumps(perms)} }}")
    lines += ["  ]", "}"]
    return "\n".join(lines)
