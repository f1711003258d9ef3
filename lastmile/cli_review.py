"""`lastmile users ...`, `lastmile link UID` and `lastmile review add-mask | unblinding-key`:
who may sign in to the review pages, the stable link a PACS button opens, and blinded LTS
reading's reference masks and key."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from dashboards.review.auth import (
    AuthError,
    User,
    Users,
    check_strength,
    hash_password,
    load_users,
    parse_roles,
    save_users,
    with_user,
    without_user,
)
from dashboards.review.blinded import BlindedStudyError, load_blinded_study, unblinding
from dashboards.review.policy import ReviewRefused
from events.base import Event
from events.catalogue import InferenceCompleted
from events.errors import EditRejected
from events.subjects import type_filter
from lastmile.cli_common import EXIT_NOT_FOUND, err, lazy, out, settings_of

if TYPE_CHECKING:  # NATS and highdicom load when a command runs
    from lastmile.services_review import review_config
else:
    review_config = lazy("lastmile.services_review", "review_config")

users_app = typer.Typer(help="Who may sign in to the pages, with which roles.",
                        no_args_is_help=True)


review_app = typer.Typer(help="Blinded reading: extra masks and the unblinding key.",
                         no_args_is_help=True)


def _load(path: Path) -> Users:
    try:
        return load_users(path)
    except AuthError as exc:
        err.print(f"[red]users:[/] {exc}")
        raise typer.Exit(3) from None


@users_app.command("add")
def users_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Sign-in name (letters, digits, . _ -).")],
    role: Annotated[list[str], typer.Option("--role", help="reader, qc, governance or "
                                            "admin; repeat for several.")],
    pipeline: Annotated[list[str] | None, typer.Option(
        "--pipeline", help="Pipelines this user reads or QCs; repeat; none = all.")] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from standard input (scripts).")] = False,
    as_user: Annotated[str | None, typer.Option("--as", help="Act as this users-file user "
                       "(governance role). Default: the OS user (os:NAME).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="File with the --as user's password.")] = None,
) -> None:
    """Add a user (or replace their roles, pipelines and password). The password is
    prompted for, must be strong (12+ characters, not a common pattern), and is stored
    only as an scrypt hash, in a file of mode 0600. A new password ends the user's open
    sessions. Recorded as an ``access.user.changed`` event with who did it."""
    from lastmile.cli_identity import record_user_change, signed_in_or_exit

    who = signed_in_or_exit(settings_of(ctx), as_user, password_file)
    cfg = review_config(settings_of(ctx))
    try:
        roles = parse_roles(role)
        from dashboards.review.auth import NAME

        if not NAME.match(name):
            raise AuthError(f"{name!r} is not a valid user name (letters, digits, . _ -)")
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        check_strength(password, name)
        user = User(name, roles, tuple(pipeline or ()), hash_password(password))
    except AuthError as exc:
        err.print(f"[red]users:[/] {exc}")
        raise typer.Exit(2) from None
    before = _load(cfg.users_file)
    save_users(cfg.users_file, with_user(before, user))
    record_user_change(settings_of(ctx), who, user.name,
                       "updated" if before.get(name) else "added",
                       sorted(r.value for r in roles), user.pipelines)
    out.print(f"user {name}: {', '.join(sorted(r.value for r in roles))}"
              f"{' for ' + ', '.join(user.pipelines) if user.pipelines else ''} "
              f"(in {cfg.users_file})")


AS_USER = typer.Option("--as", help="Act as this users-file user (governance role). "
                       "Default: the OS user (os:NAME).")
PASSWORD_FILE = typer.Option(help="File with the --as user's password.")


@users_app.command("remove")
def users_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user to remove.")],
    as_user: Annotated[str | None, AS_USER] = None,
    password_file: Annotated[Path | None, PASSWORD_FILE] = None,
) -> None:
    """Remove a user: they can no longer sign in, and their open sessions end (the pages'
    front re-reads the users file on every request). Recorded as ``access.user.changed``."""
    _change(ctx, name, None, as_user, password_file)


def _change(ctx: typer.Context, name: str, disabled: bool | None, as_user: str | None,
            password_file: Path | None) -> None:
    """Remove (``disabled`` None), disable or enable ``name``; record who did it."""
    from lastmile.cli_identity import record_user_change, signed_in_or_exit

    who = signed_in_or_exit(settings_of(ctx), as_user, password_file)
    cfg = review_config(settings_of(ctx))
    users = _load(cfg.users_file)
    user = users.get(name)
    if user is None:
        err.print(f"[red]users:[/] no user {name!r} in {cfg.users_file}")
        raise typer.Exit(5)
    if disabled is None:
        save_users(cfg.users_file, without_user(users, name))
        change, said = "removed", "removed; their sessions are ended"
    else:
        save_users(cfg.users_file, with_user(users, User(
            user.name, user.roles, user.pipelines, user.password_hash, disabled)))
        change = "disabled" if disabled else "updated"
        said = "disabled: their sessions are ended" if disabled else "enabled"
    record_user_change(settings_of(ctx), who, name, change,
                       sorted(r.value for r in user.roles), user.pipelines)
    out.print(f"user {name} {said} (in {cfg.users_file})")


@users_app.command("disable")
def users_disable(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user to disable.")],
    as_user: Annotated[str | None, AS_USER] = None,
    password_file: Annotated[Path | None, PASSWORD_FILE] = None,
) -> None:
    """Keep a user (and their history) but refuse their sign-ins and end their sessions."""
    _change(ctx, name, True, as_user, password_file)


@users_app.command("enable")
def users_enable(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user to enable again.")],
    as_user: Annotated[str | None, AS_USER] = None,
    password_file: Annotated[Path | None, PASSWORD_FILE] = None,
) -> None:
    """Let a disabled user sign in again (with their old password)."""
    _change(ctx, name, False, as_user, password_file)


@users_app.command("list")
def users_list(ctx: typer.Context) -> None:
    """The users, their roles and pipelines (never their password hashes)."""
    cfg = review_config(settings_of(ctx))
    users = _load(cfg.users_file)
    t = Table(title=str(cfg.users_file))
    for col in ("user", "roles", "pipelines", "state"):
        t.add_column(col)
    for name in sorted(users.by_name):
        u = users.by_name[name]
        t.add_row(name, ", ".join(sorted(r.value for r in u.roles)),
                  ", ".join(u.pipelines) or "(all)", "disabled" if u.disabled else "active")
    out.print(t)


def link_command(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    ours: Annotated[bool, typer.Option("--ours", help="Our case page even when XNAT is "
                                       "configured.")] = False,
) -> None:
    """Print the PACS deep link of a study (configure it as a PACS button with the
    StudyInstanceUID substituted). A study the log does not know exits 5, as `audit`."""
    from lastmile.runtime import open_bus
    from lastmile.services_review import deep_link

    settings = settings_of(ctx)
    uid = study_uid.strip()

    async def known() -> bool:
        async with open_bus(settings) as bus:
            return bool(await bus.history(uid))

    if not asyncio.run(known()):
        err.print(f"no events for study {uid}: nothing to link to")
        raise typer.Exit(EXIT_NOT_FOUND)
    print(deep_link(review_config(settings), uid, dashboard_port=settings.dashboard_port,
                    ours=ours))


@review_app.command("add-mask")
def add_mask_command(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="DICOM SEG.")],
    source: Annotated[str, typer.Option(help="Where the mask comes from (e.g. expert, "
                                        "novice).")],
    run: Annotated[str | None, typer.Option(help="Run key, if several results.")] = None,
    actor: Annotated[str, typer.Option(help="Who registers it (recorded).")] = "admin",
) -> None:
    """Add an expert or novice segmentation of a study for blinded reading."""
    from lastmile.runtime import open_bus
    from lastmile.services_review import add_mask

    settings = settings_of(ctx)
    cfg = review_config(settings)
    if source == "ai":
        err.print("[red]review:[/] the source 'ai' is the AI's own result")
        raise typer.Exit(2)

    async def go() -> Event:
        async with open_bus(settings) as bus:
            return await add_mask(bus, cfg, study_uid, source, file.read_bytes(), actor, run)

    try:
        ev = asyncio.run(go())
    except (ReviewRefused, EditRejected) as exc:
        err.print(f"[red]review:[/] {exc}")
        raise typer.Exit(1) from None
    out.print(f"{source} mask recorded for run {getattr(ev, 'run_key', '?')} "
              f"(event {ev.event_id})")


@review_app.command("unblinding-key")
def unblinding_key_command(
    ctx: typer.Context,
    out_file: Annotated[Path, typer.Option("--out", help="JSON file label -> source "
                                           "(mode 0600), for LASTMILE_UNBLINDING_KEY.")],
) -> None:
    """Write the blinded study's key (label -> ai/expert/novice) for every run of its
    pipeline in the log; only the holder of the study configuration (its salt) can."""
    from dashboards.config import ENV_BLINDED
    from lastmile.runtime import open_bus

    settings = settings_of(ctx)
    cfg = review_config(settings)
    if cfg.blinded_study is None:
        err.print(f"[red]review:[/] {ENV_BLINDED} is not set")
        raise typer.Exit(3)
    try:
        study = load_blinded_study(cfg.blinded_study)
    except BlindedStudyError as exc:
        err.print(f"[red]review:[/] {exc}")
        raise typer.Exit(3) from None

    async def go() -> dict[str, str]:
        async with open_bus(settings) as bus:
            evs = [e async for _, e, _ in bus.read(
                filter_subject=type_filter(InferenceCompleted.type_name()))
                if isinstance(e, Event)]
            return unblinding(study, evs)

    key = asyncio.run(go())
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
    out.print(f"{len(key)} labels written to {out_file}")
