"""`lastmile redact`: erase messages that leaked a value from the event log, and rebuild
the read models without them.

The log is written once and never changed, except here: when a value that must never be
there (a patient's birth date quoted by an error message, say) reached an event, the
messages holding it are deleted with JetStream's secure erase
(``$JS.API.STREAM.MSG.DELETE`` with ``no_erase: false``: the server overwrites the
message's bytes in its block file with random data, not only its index entry), the
DuckDB read model is rebuilt into a fresh file that replaces the old one (a dropped
table's bytes can linger in a database file's free pages), and one
``system.log.redacted`` event records which messages went, why and who did it: never
the value.

The values come from a file (one per line), never the command line, so they do not land
in shell history or in ``ps``. Values shorter than ``MIN_VALUE_LEN`` are refused (they
would match unrelated messages): find those messages with ``lastmile audit`` and give
their ``--sequence``. Run it with `lastmile up` stopped: it needs the read model's
single-writer lock.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lastmile.cli_common import err, out, settings_of
from lastmile.settings import Settings

if TYPE_CHECKING:
    from events.jetstream import EventBus

MIN_VALUE_LEN = 4


class RedactError(Exception):
    """The request cannot be done safely as given (and nothing was changed)."""


def read_values(path: Path) -> list[bytes]:
    """The leaked values of ``path`` (UTF-8, one per line, blank lines skipped), each in
    the forms it can take in a message body (as is, and JSON-escaped)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RedactError(f"cannot read {path}: {type(exc).__name__}") from None
    values = [v for v in lines if v]
    if not values:
        raise RedactError(f"{path} holds no value (one per line)")
    for n, v in enumerate(values, 1):
        if len(v.encode()) < MIN_VALUE_LEN:
            raise RedactError(f"{path}: value on line {n} is shorter than {MIN_VALUE_LEN} "
                              "bytes and would match unrelated messages; find the "
                              "messages with `lastmile audit` and pass --sequence")
    forms: set[bytes] = set()
    for v in values:
        forms.add(v.encode())
        forms.add(json.dumps(v)[1:-1].encode())  # as msgspec/json escape it
    return sorted(forms)


@dataclass
class Redaction:
    sequences: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)


async def find(bus: EventBus, values: list[bytes], sequences: set[int]) -> Redaction:
    """The messages (by stream sequence) whose body holds any value, or that were named."""
    found = Redaction()
    async for seq, _event, msg in bus.read():
        if seq in sequences or any(v in msg.data for v in values):
            found.sequences.append(seq)
            found.types.append(msg.subject.split(".", 3)[-1])
            found.event_ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    missing = sequences - set(found.sequences)
    if missing:
        raise RedactError(f"no message at sequence(s) {', '.join(map(str, sorted(missing)))}")
    return found


async def erase(bus: EventBus, sequences: list[int]) -> None:
    """Secure-erase each message (JetStream overwrites its bytes on disk)."""
    stream = bus.settings.stream
    for seq in sequences:
        reply = await bus.nc.request(f"$JS.API.STREAM.MSG.DELETE.{stream}",
                                     json.dumps({"seq": seq, "no_erase": False}).encode(),
                                     timeout=bus.settings.publish_timeout_s)
        answer = json.loads(reply.data)
        if not answer.get("success"):
            raise RedactError(f"JetStream did not erase message {seq}: "
                              f"{answer.get('error', {}).get('description', answer)}")


async def rebuild_read_model(bus: EventBus, settings: Settings) -> int:
    """Fold the log into a fresh DuckDB file and put it in place of the old one."""
    from projections.duckdb_store import ProjectionStore
    from projections.projector import rebuild

    path = settings.duckdb_path
    fresh = path.with_name(path.name + ".redacting")
    for stale in (fresh, Path(f"{fresh}.wal")):
        stale.unlink(missing_ok=True)
    with ProjectionStore(fresh) as store:
        n = await rebuild(bus, store)
    os.replace(fresh, path)
    Path(f"{path}.wal").unlink(missing_ok=True)
    return n


def redact_command(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (recorded; must not contain the value).")],
    grep_file: Annotated[Path | None, typer.Option(
        help="File with the leaked values, one per line (never on the command line).")] = None,
    sequence: Annotated[list[int] | None, typer.Option(
        help="Also erase the message at this stream sequence; repeat.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only list what would be erased.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_user: Annotated[str | None, typer.Option("--as", help="Act as this users-file user "
                       "(governance role). Default: the OS user (os:NAME).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="File with the --as user's password.")] = None,
) -> None:
    """Erase log messages that hold a leaked value (secure erase), rebuild the read model
    without them, and record the redaction (without the value). Stop `lastmile up` first."""
    from events.catalogue import LogRedacted
    from lastmile.cli_identity import signed_in_or_exit
    from lastmile.runtime import open_bus, read_model_lock

    settings = settings_of(ctx)
    try:
        values = read_values(grep_file) if grep_file else []
        if not values and not sequence:
            raise RedactError("nothing to look for: give --grep-file FILE or --sequence N")
        if any(v in reason.encode() for v in values):
            raise RedactError("--reason contains one of the values: describe it instead")
    except RedactError as exc:
        err.print(f"[red]redact:[/] {exc}")
        raise typer.Exit(2) from None
    who = None if dry_run else signed_in_or_exit(settings, as_user, password_file)

    async def run() -> tuple[Redaction, int]:
        async with open_bus(settings) as bus:
            found = await find(bus, values, set(sequence or ()))
            if dry_run or not found.sequences:
                return found, 0
            if not yes and not typer.confirm(
                    f"erase {len(found.sequences)} message(s) for good?", err=True):
                raise typer.Exit(1)
            await erase(bus, found.sequences)
            assert who is not None
            await bus.publish_many([*who.events(), LogRedacted.new(
                actor=who.actor, sequences=tuple(found.sequences), types=tuple(found.types),
                event_ids=tuple(found.event_ids), reason=reason, read_models_rebuilt=True)])
            return found, await rebuild_read_model(bus, settings)

    try:
        with read_model_lock(settings):
            found, folded = asyncio.run(run())
    except RedactError as exc:
        err.print(f"[red]redact:[/] {exc}")
        raise typer.Exit(1) from None
    listing = ", ".join(f"#{s} {t}" for s, t in zip(found.sequences, found.types, strict=True))
    if dry_run or not found.sequences:
        out.print(f"{len(found.sequences)} message(s) would be erased: {listing or 'none'}")
        return
    out.print(f"erased {len(found.sequences)} message(s): {listing}; the read model "
              f"{settings.duckdb_path} was rebuilt from {folded} events. Exports made "
              "before (replay --to parquet) and service logs are not changed: redo or "
              "remove them (docs/operations.md, Security).")
