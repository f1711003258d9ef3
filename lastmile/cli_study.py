"""`lastmile study complete UID`: force completion of a study by hand (reason
``forced``)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from events.base import Event
from events.catalogue import InstanceStored
from events.codec import to_builtins
from events.jetstream import EventBus
from ingest.completion import CompletionTracker
from ingest.rules import RuleSet
from lastmile.cli_common import EXIT_NOT_FOUND, err, out, settings_of
from lastmile.cli_route import open_rules
from lastmile.services_ingest import rules_path

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

    settings = settings_of(ctx)
    rules = open_rules(rules_path(settings))()

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
