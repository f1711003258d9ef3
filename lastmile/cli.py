"""The ``lastmile`` command line (the commands of README, "Command line").

Exit codes: 0 done; 1 the operation failed; 2 wrong usage; 3 bad configuration;
4 NATS unreachable or refusing; 5 nothing found (e.g. an unknown study).

Start-up (issue 17): ``lastmile --help`` imports Typer and Rich and none of Lastmile's
parts; a command module (``cli_*.py``) is imported when its command runs or shows its own
help (:class:`LazyGroup`), and imports the heavy packages (NATS, pydicom, DuckDB, the
runtimes) inside the command that needs them. ``lastmile bench cli`` measures it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.main import get_group

from lastmile.cli_common import (
    EXIT_BUS,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    err,
    out,
    settings_of,
)

if TYPE_CHECKING:
    from events.base import Event

# --------------------------------------------------------------------------- command groups
# One small module per group, imported only when its command runs. `lastmile --help` lists
# them from this table: name -> (its line there: the first paragraph of the command's
# docstring or of its group's help, word for word; the module; the command function or
# Typer group in it), in help order. tests/cli/test_startup.py checks the lines against
# the commands' own.
LAZY: dict[str, tuple[str, str, str]] = {
    "metrics": ("Governance metrics from the read model (turnaround, runtime, outcomes, "
                "agreement,\ndrift), each with its 95% CI or \"not enough data\".",
                "lastmile.cli_projections", "metrics_command"),
    "dashboard": ("Run only the governance dashboard (Streamlit) on the read model, until "
                  "Ctrl-C.", "lastmile.cli_dashboard", "dashboard_command"),
    "demo": ("Start everything (`lastmile up`), send synthetic studies to the three "
             "pipelines,\nsimulate QC and readers, print a summary; stays up until Ctrl-C.",
             "lastmile.cli_demo", "demo_command"),
    "link": ("Print the PACS deep link of a study (configure it as a PACS button with the\n"
             "StudyInstanceUID substituted). A study the log does not know exits 5, as "
             "`audit`.", "lastmile.cli_review", "link_command"),
    "export": ("Write a de-identified retraining set: DICOM (PS3.15 basic profile, modified "
               "dates,\nclean descriptors), NIfTI with an nnU-Net v2 dataset.json and a MONAI "
               "datalist, the\nevent tables, and a manifest of what was removed.",
               "lastmile.cli_export", "export_command"),
    "redact": ("Erase log messages that hold a leaked value (secure erase), rebuild the read "
               "model\nwithout them, and record the redaction (without the value). Stop "
               "`lastmile up` first.", "lastmile.cli_redact", "redact_command"),
    "check": ("Send a folder of DICOM to a running Lastmile as a modality would, one "
              "association\nper study, and report each study's outcome: completion, "
              "pipeline, result (valid,\nrefused with its reason, partial, superseded, no "
              "pipeline), times.", "lastmile.cli_check", "check_command"),
    "bench": ("Benchmarks against real servers, with a peer in the same run.",
              "lastmile.cli_bench", "bench_app"),
    "route": ("Routing rules: which pipelines a file would go to.",
              "lastmile.cli_route", "route_app"),
    "study": ("Studies: force completion by hand, run again.",
              "lastmile.cli_study", "study_app"),
    "pipelines": ("Pipeline files: list, deploy, change stage, retire.",
                  "lastmile.cli_pipelines", "pipelines_app"),
    "projections": ("The DuckDB read models folded from the event log.",
                    "lastmile.cli_projections", "projections_app"),
    "xnat": ("XNAT: check the connection the publisher will use.",
             "lastmile.cli_xnat", "xnat_app"),
    "users": ("Who may sign in to the pages, with which roles.",
              "lastmile.cli_review", "users_app"),
    "review": ("Blinded reading: extra masks and the unblinding key.",
               "lastmile.cli_review", "review_app"),
    "security": ("NATS users per service role: print their server configuration, rotate "
                 "their passwords.", "lastmile.cli_security", "security_app"),
}


#: commands a group gets from another module: group -> [(name, module, function)]
ADDED: dict[str, list[tuple[str, str, str]]] = {
    "pipelines": [("from-bundle", "lastmile.cli_bundle", "from_bundle_command")],
}


def _built(name: str, module: str, attribute: str) -> Any:
    """``module.attribute`` (a command function or a Typer group) as the click command
    Typer builds for it under ``name``, with the root's defaults (as ``add_typer`` or
    ``command`` on the root would)."""
    target = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer()
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(target)
    return get_group(holder).commands[name]


def load_command(name: str) -> Any:
    """The command ``name`` of :data:`LAZY` (a click command or group) as ``lastmile`` runs
    it; imports its module. Raises ``KeyError`` for a name not in :data:`LAZY`."""
    command = _built(name, *LAZY[name][1:])
    for sub in ADDED.get(name, ()):
        command.add_command(_built(*sub))
    return command


class _Listed(TyperCommand):
    """A command of :data:`LAZY` shown by its help line, not loaded yet."""


class LazyGroup(TyperGroup):
    """``lastmile``'s root group: the commands of :data:`LAZY` are listed from the table and
    built (their module imported) only when one is invoked or asked for its help."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, (help_line, _, _) in LAZY.items():  # after up, audit, replay: help order
            self.commands.setdefault(name, _Listed(name, help=help_line))

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name = args[0] if args else None
        if name in LAZY and isinstance(self.commands.get(name), _Listed):
            self.commands[name] = load_command(name)  # the placeholder becomes the command
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="lastmile",
    help="Lastmile: take radiology ML models into the clinic and prove they work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=LazyGroup,
)


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="TOML settings file.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="State directory [./.lastmile].")] = None,
    nats_url: Annotated[
        str | None,
        typer.Option(help="Use this NATS server/cluster (comma-separated) instead of the "
                     "embedded one."),
    ] = None,
    nats_user: Annotated[str | None, typer.Option(help="NATS user.")] = None,
    nats_password: Annotated[
        str | None, typer.Option(help="NATS password (prefer LASTMILE_NATS_PASSWORD).")
    ] = None,
    nats_creds: Annotated[Path | None, typer.Option(help="NATS .creds file.")] = None,
    nats_tls_ca: Annotated[Path | None, typer.Option(help="CA for NATS TLS.")] = None,
    nats_tls_cert: Annotated[Path | None, typer.Option(help="Client certificate.")] = None,
    nats_tls_key: Annotated[Path | None, typer.Option(help="Client key.")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = None,
) -> None:
    from rich.logging import RichHandler

    from lastmile.settings import load_settings

    settings = load_settings(
        config,
        state_dir=state_dir,
        nats_url=nats_url,
        nats_user=nats_user,
        nats_password=nats_password,
        nats_creds=nats_creds,
        nats_tls_ca=nats_tls_ca,
        nats_tls_cert=nats_tls_cert,
        nats_tls_key=nats_tls_key,
        log_level=log_level,
    )
    logging.basicConfig(
        level=settings.log_level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("highdicom", "pynetdicom", "streamlit"):  # chatty at INFO; ours is enough
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(
            settings.log_level)))
    os.umask(0o077)  # whatever a command writes (state, exports) is its user's alone
    ctx.obj = settings


# --------------------------------------------------------------------------- up


@app.command()
def up(ctx: typer.Context) -> None:
    """Start NATS (embedded unless --nats-url) and Lastmile's services; stop with Ctrl-C."""
    import asyncio

    from lastmile.runtime import Supervisor, embedded_server
    from lastmile.services import services_for

    settings = settings_of(ctx)

    async def ready(bus: Any) -> None:
        seq = await bus.last_sequence()
        out.print(f"[green]Lastmile is up[/]: NATS {', '.join(settings.nats_servers())}, "
                  f"stream {bus.settings.stream} at event #{seq}. Ctrl-C stops.")

    async def run() -> None:
        await Supervisor(settings, services_for(settings), on_ready=ready).run()

    if settings.embedded_nats:
        with embedded_server(settings) as server:
            out.print(f"embedded nats-server pid {server.pid} on {server.url} "
                      f"(data {settings.state_dir / 'nats'}, sync {settings.nats_sync})")
            asyncio.run(run())
    else:
        asyncio.run(run())
    out.print("stopped cleanly")


# --------------------------------------------------------------------------- audit


# envelope and provenance detail that `--json` keeps but a person scanning a timeline skips
_AUDIT_SKIP = frozenset({
    "event_id", "schema_version", "occurred_at", "recorded_at", "correlation_id",
    "causation_id", "actor", "study_uid", "pipeline", "type", "sha256", "store_key",
    "association_id", "transfer_syntax_uid", "sop_class_uid", "source_address",
    "accession_pseudonym", "patient_pseudonym", "manufacturer_model", "station_name",
    "institution", "pixel_spacing_mm", "series_uid", "run_key", "model_sha256",
    "payload_sha256", "file_sha256",
})


def _summary(event: Event, limit: int = 200) -> str:
    from events.catalogue import SeriesSelected
    from events.codec import to_builtins

    if isinstance(event, SeriesSelected):  # every series and why, in full (issue 16)
        return "\n".join(f"{'chosen' if c.chosen else 'rejected'} {c.series_uid}: {c.reason}"
                         for c in event.series)
    parts = []
    for key, value in to_builtins(event).items():
        if key in _AUDIT_SKIP or value in (None, "", [], {}):
            continue
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        parts.append(f"{key}={text if len(text) < 60 else text[:57] + '...'}")
    line = " ".join(parts)
    return line if len(line) <= limit else line[: limit - 3] + "..."


@app.command()
def audit(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The full event history of one study (reads only that study's subject)."""
    import asyncio

    from rich.table import Table

    from events.codec import to_builtins
    from lastmile.runtime import open_bus

    async def run() -> list[tuple[int, Event]]:
        async with open_bus(settings_of(ctx)) as bus:
            return await bus.history(study_uid)

    history = asyncio.run(run())
    if not history and not as_json:
        err.print(f"no events for study {study_uid}")
        raise typer.Exit(EXIT_NOT_FOUND)
    if as_json:
        print(json.dumps([{"sequence": s, **to_builtins(e)} for s, e in history], indent=1))
    else:
        table = Table(title=f"study {study_uid}: {len(history)} events")
        for col in ("#", "occurred (UTC)", "type", "actor", "pipeline", "what"):
            table.add_column(col, overflow="fold")
        for seq, ev in history:
            table.add_row(str(seq), ev.occurred_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                          ev.type_name(), ev.actor, ev.pipeline or "", _summary(ev))
        out.print(table)
    if not history:
        raise typer.Exit(EXIT_NOT_FOUND)


# --------------------------------------------------------------------------- replay


@app.command()
def replay(
    ctx: typer.Context,
    to: Annotated[
        tuple[str, Path] | None,
        typer.Option(help="Write to a format and directory: --to parquet DIR. "
                     "Without it, JSON lines go to stdout."),
    ] = None,
    deidentify: Annotated[
        bool, typer.Option(help="De-identify: UIDs (registry UIDs kept), ids, people and "
                           "per-patient shifted dates remapped; sites, addresses, AE titles, "
                           "file hashes and paths removed (see events/deidentify.py).")
    ] = False,
    study: Annotated[str | None, typer.Option(help="Only this StudyInstanceUID.")] = None,
    from_sequence: Annotated[int, typer.Option(help="Start at this stream sequence.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Replay the event log in order: to stdout, or exported for audit and retraining."""
    import asyncio

    from events.deidentify import Deidentifier, LogContext, Pseudonymiser, export_key
    from events.errors import CodecError
    from events.export import ParquetExporter, json_line
    from lastmile.runtime import open_bus

    settings = settings_of(ctx)
    if to is not None and to[0] != "parquet":
        err.print(f"unknown format {to[0]!r}: the only one is parquet (--to parquet DIR)")
        raise typer.Exit(2)

    async def run() -> tuple[int, int]:
        n = bad = 0
        async with open_bus(settings) as bus:
            deid = None
            if deidentify:  # a first pass: whose study is whose, what to clean from text
                context = LogContext()
                async for seq, ev, _ in bus.read(study_uid=study, from_sequence=from_sequence):
                    if not isinstance(ev, CodecError):
                        context.learn(seq, ev)
                deid = Deidentifier(Pseudonymiser(export_key(settings.secret())), context)
            exporter = ParquetExporter(to[1], deid=deid) if to else None
            async for seq, ev, _ in bus.read(study_uid=study, from_sequence=from_sequence):
                if isinstance(ev, CodecError):
                    bad += 1
                    continue
                n += 1
                if exporter is not None:
                    exporter.add(seq, ev)
                else:
                    sys.stdout.write(json_line(seq, ev, deid) + "\n")
            if exporter is not None and to is not None:
                from lastmile.services_projections import export_labels_from_bus

                exporter.close()
                await export_labels_from_bus(
                    bus, to[1], deid=deid, study_uid=study, from_sequence=from_sequence)
        return n, bad

    n, bad = asyncio.run(run())
    if to is not None:
        summary = {"events": n, "undecodable": bad, "path": str(to[1] / "events.parquet"),
                   "deidentified": deidentify}
        if as_json:
            print(json.dumps(summary))
        else:
            out.print(f"wrote {n} events to {summary['path']}"
                      + (" (de-identified)" if deidentify else "")
                      + (f"; {bad} undecodable messages skipped" if bad else ""))


# --------------------------------------------------------------------------- entry


def main() -> None:
    """Entry point: domain errors become one clear line and a meaningful exit code."""
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the log's errors, imported only when one is raised
        from events.errors import BusUnavailable, ConfigError, EventsError, PublishError

        if isinstance(exc, ConfigError):
            err.print(f"[red]configuration:[/] {exc}")
            sys.exit(EXIT_CONFIG)
        if isinstance(exc, BusUnavailable | PublishError):
            err.print(f"[red]NATS:[/] {exc}")
            sys.exit(EXIT_BUS)
        if isinstance(exc, EventsError):
            err.print(f"[red]error:[/] {exc}")
            sys.exit(EXIT_FAILED)
        raise


if __name__ == "__main__":
    main()
