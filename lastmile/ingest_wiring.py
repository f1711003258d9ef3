"""Ingest in the composition root: services for ``lastmile up``, ``lastmile route test``,
``lastmile study complete`` and ``lastmile bench ingest``.

Register (one line each, in ``lastmile/services.py`` and ``lastmile/cli.py``)::

    services.extend(ingest_services(settings))            # services_for()
    app.add_typer(route_app, name="route")                 # cli.py
    app.add_typer(study_app, name="study")                 # cli.py
    bench_app.command("ingest")(bench_ingest)              # cli.py
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from rich.console import Console
from rich.table import Table

from dicom_rules.conditions import evaluate
from events.base import Event
from events.catalogue import InstanceStored
from events.codec import to_builtins
from events.jetstream import EventBus
from ingest.app import IngestApp, IngestOptions
from ingest.completion import CompletionTracker
from ingest.dataset import tag_values
from ingest.dicom_scp import ScpConfig
from ingest.errors import IngestError
from ingest.rules import EXAMPLE_RULES, RuleSet, route
from ingest.rules_file import RulesFile
from lastmile.runtime import Service
from lastmile.settings import ConfigError, Settings

out = Console()
err = Console(stderr=True)

EXIT_FAILED = 1
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 5


# --------------------------------------------------------------------------- settings


def rules_path(settings: Settings) -> Path:
    """The configured rules file, else the shipped example (the paper's three pipelines)."""
    return settings.routing_rules or EXAMPLE_RULES


def ingest_options(settings: Settings) -> IngestOptions:
    return IngestOptions(
        instances_dir=settings.instances_dir,
        scp=ScpConfig(
            host=settings.dicom_host,
            port=settings.dicom_port,
            general_ae=settings.dicom_general_ae,
            max_pdu=settings.dicom_max_pdu,
            max_associations=settings.dicom_max_associations,
            allowed_calling_aes=tuple(settings.dicom_allowed_calling_aes),
            allowed_addresses=tuple(settings.dicom_allowed_addresses),
        ),
        rules_path=rules_path(settings),
        max_instance_bytes=settings.dicom_max_instance_mb * 2**20,
        min_free_bytes=settings.dicom_min_free_mb * 2**20,
        publish_timeout_s=settings.dicom_publish_timeout_s,
    )


def _open_rules(path: Path) -> RulesFile:
    try:
        return RulesFile.open(path)
    except IngestError as exc:
        err.print(f"[red]routing rules:[/] {exc}")
        raise typer.Exit(EXIT_CONFIG) from None


# --------------------------------------------------------------------------- services


class ScpService(Service):
    """The DICOM Storage SCP (store + acked event before Success)."""

    name = "dicom-scp"

    def __init__(self, app: IngestApp) -> None:
        self.app = app

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        await self.app.scp.run(bus, stop)


class CompletionService(Service):
    """Study completion: folds the log at start, then follows it."""

    name = "study-completion"

    def __init__(self, app: IngestApp) -> None:
        self.app = app

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        await self.app.run_detector(bus, stop)


def ingest_services(settings: Settings) -> list[Service]:
    """Both services share one app, so association-release hints reach the detector."""
    options = ingest_options(settings)
    try:
        rules = RulesFile.open(options.rules_path)
    except IngestError as exc:  # an invalid rules file at start: a configuration error
        raise ConfigError(f"routing rules: {exc}") from None
    app = IngestApp(options, settings.secret(), rules)
    return [ScpService(app), CompletionService(app)]


# --------------------------------------------------------------------------- route test

route_app = typer.Typer(help="Routing rules: which pipelines a file would go to.",
                        no_args_is_help=True)


def explain(rules: RuleSet, path: Path, called_ae: str | None) -> dict[str, object]:
    """Which rules and pipelines a file matches, and why (pure apart from reading it)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    tags = tag_values(ds, rules.tags())
    by_ae = rules.ae_titles().get(called_ae or "")
    decision = route(rules, tags)
    per_rule = []
    for rule in rules.rules:
        if rule.when is None:
            per_rule.append({"rule": rule.id, "enabled": rule.enabled, "fallback": True,
                             "matched": rule.id in decision.rule_ids, "why": "fallback"})
            continue
        ok, why = evaluate(rule.when, tags)
        per_rule.append({"rule": rule.id, "enabled": rule.enabled, "fallback": rule.fallback,
                         "matched": ok and rule.enabled, "why": why})
    return {
        "file": str(path),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "called_ae": called_ae,
        "pipelines": [by_ae] if by_ae else list(decision.pipelines),
        "decided_by": f"AE title {called_ae}" if by_ae else "rules",
        "matched_rules": list(decision.rule_ids),
        "fallback": decision.fallback,
        "rules": per_rule,
    }


@route_app.command("test")
def route_test(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="DICOM files", exists=True,
                                                dir_okay=False)],
    rules_file: Annotated[Path | None, typer.Option(
        "--rules", help="Rules YAML [LASTMILE_ROUTING_RULES, else the shipped example]")] = None,
    called_ae: Annotated[str | None, typer.Option(
        help="Pretend the file arrived on this AE title (LM_BTS ... go straight to their "
             "pipeline).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Which rules and pipelines each file would match, and why."""
    settings: Settings | None = ctx.obj if isinstance(ctx.obj, Settings) else None
    path = rules_file or (rules_path(settings) if settings else EXAMPLE_RULES)
    rules = _open_rules(path)()
    results = []
    for f in files:
        try:
            results.append(explain(rules, f, called_ae))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            results.append({"file": str(f), "error": f"not readable as DICOM: {exc}"})
    if as_json:
        print(json.dumps({"rules_file": str(path), "results": results}, indent=1))
    else:
        out.print(f"rules: {path}")
        for res in results:
            if "error" in res:
                out.print(f"[red]{res['file']}[/]: {res['error']}")
                continue
            pipes = ", ".join(res["pipelines"]) or "(none: stored only)"  # type: ignore[arg-type]
            out.print(f"[bold]{res['file']}[/] -> [green]{pipes}[/] ({res['decided_by']})")
            table = Table(show_header=True)
            for col in ("rule", "enabled", "matched", "why"):
                table.add_column(col, overflow="fold")
            for row in res["rules"]:  # type: ignore[attr-defined]
                table.add_row(row["rule"], "yes" if row["enabled"] else "no",
                              "[green]yes[/]" if row["matched"] else "no", row["why"])
            out.print(table)
    if any("error" in r for r in results):
        raise typer.Exit(EXIT_FAILED)


# --------------------------------------------------------------------------- study complete

study_app = typer.Typer(help="Studies: force completion by hand.", no_args_is_help=True)


async def force_complete(bus: EventBus, rules: RuleSet, study_uid: str,
                         pipeline: str | None) -> tuple[list[Event], int]:
    """Fold one study's history and publish ``forced`` completions; returns (events, stored)."""
    history = [ev for _, ev in await bus.history(study_uid)]
    tracker = CompletionTracker(rules)
    tracker.observe_all(history)
    stored = [ev for ev in history if isinstance(ev, InstanceStored)]
    events: list[Event] = list(tracker.force(study_uid, pipeline, datetime.now(UTC), stored))
    for ev in events:
        await bus.publish(ev)
    return events, len(stored)


@study_app.command("complete")
def study_complete(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID")],
    pipeline: Annotated[str | None, typer.Option(
        help="Only this pipeline (also one the study was not routed to).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Force completion of a study now (reason: forced), for its pending pipelines."""
    from lastmile.runtime import open_bus

    settings: Settings = ctx.obj
    rules = _open_rules(rules_path(settings))()

    async def run() -> tuple[list[Event], int]:
        async with open_bus(settings) as bus:
            return await force_complete(bus, rules, study_uid, pipeline)

    events, stored = asyncio.run(run())
    if as_json:
        print(json.dumps({"study_uid": study_uid, "instances": stored,
                          "completed": [to_builtins(e) for e in events]}, indent=1))
    elif not stored:
        err.print(f"no stored instances for study {study_uid}")
    elif not events:
        out.print(f"study {study_uid}: nothing pending (already complete for its pipelines, "
                  "or routed to none: give --pipeline)")
    else:
        for ev in events:
            out.print(f"study {study_uid} completed for [green]{ev.pipeline}[/] (forced, "
                      f"{getattr(ev, 'instance_count', 0)} instances)")
    if not stored:
        raise typer.Exit(EXIT_NOT_FOUND)


# --------------------------------------------------------------------------- bench


def bench_ingest(
    count: Annotated[int, typer.Option(min=10, help="CT instances per run.")] = 200,
    studies: Annotated[int, typer.Option(min=1, help="Studies for completion latency.")] = 20,
    peers: Annotated[bool, typer.Option(help="Also measure dcmtk storescp and Orthanc.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """C-STORE 200 CT instances with dcmtk storescu into our SCP, storescp and Orthanc."""
    from bench.ingest import run_ingest_bench

    result = asyncio.run(run_ingest_bench(count=count, studies=studies, peers=peers))
    if as_json:
        print(json.dumps(asdict(result), indent=1))
        return
    table = Table(title=f"bench ingest: {result.count} CT instances of "
                  f"{result.instance_bytes / 2**20:.2f} MiB, dcmtk storescu, TCP_NODELAY=1")
    for col in ("receiver", "associations", "MB/s", "instances/s", "seconds"):
        table.add_column(col)
    for run in result.runs:
        table.add_row(run.receiver, str(run.associations), f"{run.mb_per_s:.1f}",
                      f"{run.instances_per_s:.1f}", f"{run.seconds:.2f}")
    out.print(table)
    for key, value in result.ratios.items():
        out.print(f"{key}: {value:.2f}")
    out.print(f"completion latency over {result.studies} studies: p50 "
              f"{result.completion_p50_s:.2f} s, p90 {result.completion_p90_s:.2f} s")
    out.print(f"machine: {os.cpu_count()} cores, 1-min load {result.load_average[0]} at start, "
              f"{result.load_average[1]} at end (figures are noisy on a busy machine)")
    for note in result.notes:
        out.print(f"note: {note}")
