"""`lastmile study complete UID` and `lastmile study rerun UID`: force completion of a
study by hand (reason ``forced``); run a completed study again, recorded with who and why
(``engine.study.rerun_requested``; the new result supersedes the earlier ones)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from events.base import Event
from events.catalogue import InstanceStored, StudyCompleted, StudyRerunRequested
from events.codec import to_builtins
from lastmile.cli_common import EXIT_NOT_FOUND, err, out, settings_of
from lastmile.cli_route import open_rules

if TYPE_CHECKING:  # NATS and the receiver's rules (pydicom) load when a command runs
    from events.jetstream import EventBus
    from ingest.rules import RuleSet

study_app = typer.Typer(help="Studies: force completion by hand, run again.",
                        no_args_is_help=True)


async def force_complete(bus: EventBus, rules: RuleSet, study_uid: str,
                         pipeline: str | None) -> tuple[list[Event], int]:
    """Fold one study's history and publish ``forced`` completions; returns (events, stored)."""
    from ingest.completion import CompletionTracker

    history = [ev for _, ev in await bus.history(study_uid)]
    tracker = CompletionTracker(rules)
    tracker.observe_all(history)
    stored = [ev for ev in history if isinstance(ev, InstanceStored)]
    events: list[Event] = list(tracker.force(study_uid, pipeline, datetime.now(UTC), stored))
    for ev in events:
        await bus.publish(ev)
    return events, len(stored)


def nothing_completed(study_uid: str, pipeline: str | None, completed_for: list[str]) -> str:
    """Why ``study complete`` completed nothing, and what to do instead (our words)."""
    rerun = f"lastmile study rerun {study_uid} --pipeline {{p}} --why TEXT"
    if pipeline is not None:
        return (f"study {study_uid} is already complete for {pipeline}: completing it again "
                f"would run nothing; to run it again: {rerun.format(p=pipeline)}")
    if completed_for:
        return (f"study {study_uid} is already complete for {', '.join(completed_for)}; to "
                f"run it again: {rerun.format(p='P')}")
    return (f"study {study_uid} was routed to no pipeline: give --pipeline P to complete it "
            "for one")


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
    from lastmile.services_ingest import rules_path

    settings = settings_of(ctx)
    rules = open_rules(rules_path(settings))()

    async def run() -> tuple[list[Event], int]:
        async with open_bus(settings) as bus:
            return await force_complete(bus, rules, study_uid, pipeline)

    async def completed_for() -> list[str]:
        async with open_bus(settings) as bus:
            return sorted({ev.pipeline for _, ev in await bus.history(study_uid)
                           if isinstance(ev, StudyCompleted) and ev.pipeline})

    events, stored = asyncio.run(run())
    why = nothing_completed(study_uid, pipeline, asyncio.run(completed_for())) if (
        stored and not events) else None
    if as_json:
        print(json.dumps({"study_uid": study_uid, "instances": stored,
                          "completed": [to_builtins(e) for e in events],
                          "error": why}, indent=1))
    elif not stored:
        err.print(f"no stored instances for study {study_uid}")
    elif why is not None:
        err.print(f"[red]{why}[/]")
    else:
        for ev in events:
            out.print(f"study {study_uid} completed for [green]{ev.pipeline}[/] (forced, "
                      f"{getattr(ev, 'instance_count', 0)} instances)")
    if not stored:
        raise typer.Exit(EXIT_NOT_FOUND)
    if why is not None:
        raise typer.Exit(1)


async def request_rerun(bus: EventBus, study_uid: str, pipeline: str, why: str, actor: str,
                        before: Sequence[Event] = ()) -> StudyRerunRequested:
    """Record ``engine.study.rerun_requested`` (the worker runs it; a new result
    supersedes the earlier ones). Raises ``LookupError`` when the study has no stored
    instance, ``ValueError`` when the pipeline is not deployed (or retired), both with
    the reason in our words."""
    from events.deployments import PIPELINE_EVENTS, fold_pipelines

    if not why.strip():
        raise ValueError("a re-run needs a reason (--why): it is the audit trail")
    history = await bus.history(study_uid)
    if not any(isinstance(ev, InstanceStored) for _, ev in history):
        raise LookupError(f"no stored instances for study {study_uid}")
    deployed = fold_pipelines([ev async for _, ev, _ in bus.read(filter_subject=PIPELINE_EVENTS)
                               if isinstance(ev, Event)]).get(pipeline)
    if deployed is None or deployed.retired:
        state = "retired" if deployed else "not deployed"
        raise ValueError(f"pipeline {pipeline} is {state}: nothing would run (lastmile "
                         "pipelines deploy FILE)")
    ev = StudyRerunRequested.new(actor=actor, study_uid=study_uid, pipeline=pipeline,
                                 why=why.strip(), file_sha256=deployed.file_sha256)
    await bus.publish_many([*before, ev])
    return ev


#: what a re-run ends in (types caused by the request)
RERUN_OUTCOMES = ("engine.inference.completed", "engine.inference.failed",
                  "engine.inference.skipped", "engine.study.not_run")


@study_app.command("rerun")
def study_rerun(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID")],
    pipeline: Annotated[str, typer.Option(help="The deployed pipeline to run it with.")],
    why: Annotated[str, typer.Option(help="Why (recorded in the log with who asked).")],
    as_user: Annotated[str | None, typer.Option("--as", help="Act as this user of the "
                       "users file (password asked). Default: the OS user (os:NAME).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="File with the --as user's password.")] = None,
    wait: Annotated[float, typer.Option(help="Wait this many seconds for the outcome "
                                        "(0: return once recorded).")] = 0.0,
) -> None:
    """Run a study again with a deployed pipeline (its current file): recorded with who
    and why; the new result supersedes the earlier ones. The run key includes the
    request, so it runs even when the file is unchanged."""
    from lastmile.cli_identity import signed_in_or_exit
    from lastmile.runtime import open_bus

    settings = settings_of(ctx)
    who = signed_in_or_exit(settings, as_user, password_file)

    async def run() -> tuple[StudyRerunRequested, Event | None]:
        async with open_bus(settings) as bus:
            ev = await request_rerun(bus, study_uid, pipeline, why, who.actor,
                                     list(who.events()))
            outcome: Event | None = None
            deadline = asyncio.get_running_loop().time() + wait
            while wait > 0 and outcome is None:
                outcome = next((e for _, e in await bus.history(study_uid)
                                if e.causation_id == ev.event_id
                                and e.type_name() in RERUN_OUTCOMES), None)
                if outcome is None:
                    if asyncio.get_running_loop().time() > deadline:
                        break
                    await asyncio.sleep(0.5)
            return ev, outcome

    try:
        ev, outcome = asyncio.run(run())
    except LookupError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_NOT_FOUND) from None
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    out.print(f"re-run of study {study_uid} by {pipeline} requested by {ev.actor} "
              f"(file sha256 {(ev.file_sha256 or '')[:12]}; event {ev.event_id})")
    if wait > 0:
        if outcome is None:
            err.print(f"[yellow]no outcome within {wait:g} s[/] (lastmile audit {study_uid})")
            raise typer.Exit(1)
        detail = getattr(outcome, "reason", None) or getattr(outcome, "error", None) or ""
        out.print(f"outcome: {outcome.type_name()} {detail}".rstrip())
        if outcome.type_name() != "engine.inference.completed":
            raise typer.Exit(1)
