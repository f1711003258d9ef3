"""Who runs a CLI command that changes governance state (pipelines, users).

The actor recorded in the event comes from an identity the command can check, never
from a free-text flag:

- ``--as NAME``: a user of the users file (``LASTMILE_USERS_FILE``, default
  ``<state_dir>/users.toml``) with the ``governance`` or ``admin`` role, who proves it
  with their password (asked on the terminal, or the first line of ``--password-file``,
  so it never lands in shell history). The actor is ``user:NAME``; the sign-in, or the
  refused one, is an event (``access.sign_in.succeeded`` / ``.failed``, channel ``cli``).
- otherwise the operating-system account running the command on the host, from the
  kernel's effective uid (not ``$USER``, which anyone can set): actor ``os:NAME``. Whoever
  can run commands as that account can read the state directory anyway.
"""

from __future__ import annotations

import getpass
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from events.base import Event
from events.catalogue import SignedIn, SignInFailed
from lastmile.settings import Settings


class SignInRefused(Exception):
    """The password did not match, the user is unknown, or lacks the role. ``event`` is
    the ``access.sign_in.failed`` fact to record before refusing."""

    def __init__(self, message: str, event: SignInFailed) -> None:
        super().__init__(message)
        self.event = event


@dataclass(frozen=True)
class CliIdentity:
    actor: str  # "user:<name>" or "os:<login>"
    sign_in: SignedIn | None = None  # the event to record with the action, if any

    def events(self) -> list[Event]:
        return [self.sign_in] if self.sign_in is not None else []


def os_user() -> str:
    """The login name of the effective uid (the kernel's answer, not the environment)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def identify(settings: Settings, as_user: str | None, password_file: Path | None = None,
             password: str | None = None) -> CliIdentity:
    """The identity of this command (see the module docstring).

    Raises ``SignInRefused`` (with the failure event) for a wrong password, an unknown
    user, a user without a governance role, or a password file others can read.
    """
    if as_user is None:
        return CliIdentity(f"os:{os_user()}")
    from dashboards.config import ENV_STATE_DIR, ReviewConfig
    from dashboards.review.auth import AuthError, Role, authenticate, load_users

    def refused(reason: str, known: bool) -> SignInRefused:
        event = SignInFailed.new(actor=f"os:{os_user()}", channel="cli", reason=reason,
                                 user=as_user if known else None)
        return SignInRefused(f"sign-in as {as_user} refused: {reason}", event)

    cfg = ReviewConfig.from_env({**os.environ, ENV_STATE_DIR: os.environ.get(
        ENV_STATE_DIR, str(settings.state_dir))})
    try:
        users = load_users(cfg.users_file)
    except AuthError as exc:
        raise refused(f"users file unusable ({exc})", False) from None
    if password is None:
        if password_file is not None and password_file.stat().st_mode & 0o077:
            raise refused(f"password file {password_file} is readable by others "
                          "(chmod 600 it)", users.get(as_user) is not None)
        password = (password_file.read_text().splitlines() or [""])[0] \
            if password_file is not None else getpass.getpass(f"Password for {as_user}: ")
    user = authenticate(users, as_user, password)
    if user is None:
        known = users.get(as_user) is not None
        raise refused("wrong password" if known else "unknown user", known)
    if not user.has(Role.GOVERNANCE):
        raise refused("the governance or admin role is needed", True)
    actor = f"user:{user.name}"
    return CliIdentity(actor, SignedIn.new(actor=actor, user=user.name, channel="cli",
                                           method="password"))


def signed_in_or_exit(settings: Settings, as_user: str | None,
                      password_file: Path | None) -> CliIdentity:
    """``identify``, for a command: a refusal is recorded in the log, said on stderr,
    and ends the command with exit code 1."""
    import asyncio

    import typer

    from lastmile.cli_common import err
    from lastmile.runtime import open_bus

    try:
        return identify(settings, as_user, password_file)
    except SignInRefused as exc:
        refusal = exc

    async def record() -> None:
        async with open_bus(settings) as bus:
            await bus.publish(refusal.event)

    asyncio.run(record())
    err.print(f"[red]{refusal}[/] (recorded)")
    raise typer.Exit(1)



def record_user_change(settings: Settings, who: CliIdentity, user: str, change: str,
                       roles: Sequence[str] = (), pipelines: Sequence[str] = ()) -> None:
    """Record that ``who`` changed who may sign in (``access.user.changed``)."""
    import asyncio

    from events.catalogue import UserChanged
    from lastmile.runtime import open_bus

    event = UserChanged.new(actor=who.actor, user=user, change=change, roles=tuple(roles),
                            pipelines=tuple(pipelines))

    async def record() -> None:
        async with open_bus(settings) as bus:
            await bus.publish_many([*who.events(), event])

    asyncio.run(record())
