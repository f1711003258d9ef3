"""`lastmile pipelines list | deploy | stage | retire | reference`: pipeline files and their
stages, each change an event; the reference generated from the code."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from engine.errors import EngineError
from events.base import Event
from events.catalogue import Stage
from events.deployments import PIPELINE_EVENTS, fold_pipelines
from lastmile.cli_common import err, lazy, out, settings_of

if TYPE_CHECKING:  # the engine (pydicom, the runtimes) and NATS load when a command runs
    from engine.registry import deployed_event, retired_event, stage_changed_event
    from engine.spec import discover, load_pipeline
    from events.jetstream import EventBus
    from lastmile.services_engine import pipeline_dirs
else:
    deployed_event = lazy("engine.registry", "deployed_event")
    retired_event = lazy("engine.registry", "retired_event")
    stage_changed_event = lazy("engine.registry", "stage_changed_event")
    discover = lazy("engine.spec", "discover")
    load_pipeline = lazy("engine.spec", "load_pipeline")
    pipeline_dirs = lazy("lastmile.services_engine", "pipeline_dirs")

pipelines_app = typer.Typer(help="Pipeline files: list, deploy, change stage, retire.",
                            no_args_is_help=True)


def _signed_in(ctx: typer.Context, as_user: str | None, password_file: Path | None) -> Any:
    from lastmile.cli_identity import signed_in_or_exit

    return signed_in_or_exit(settings_of(ctx), as_user, password_file)


AsUser = Annotated[str | None, typer.Option("--as", help="Act as this user of the users "
                   "file (governance role; password asked). Default: the OS user (os:NAME).")]
PasswordFile = Annotated[Path | None, typer.Option(help="File with the --as user's password.")]


async def _fold(bus: EventBus) -> dict[str, Any]:
    events = [ev async for _, ev, _ in bus.read(filter_subject=PIPELINE_EVENTS)
              if isinstance(ev, Event)]
    return fold_pipelines(events)


def _run(ctx: typer.Context, coro_fn: Any) -> Any:
    from lastmile.runtime import open_bus

    async def go() -> Any:
        async with open_bus(settings_of(ctx)) as bus:
            return await coro_fn(bus)

    return asyncio.run(go())


@pipelines_app.command("list")
def pipelines_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Pipeline files found and their deployed state (from the event log)."""
    settings = settings_of(ctx)
    try:
        files = discover(pipeline_dirs(settings))
    except EngineError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(3) from None
    state = _run(ctx, _fold)
    rows = []
    for name in sorted(set(files) | set(state)):
        f, d = files.get(name), state.get(name)
        rows.append({
            "name": name,
            "file": str(f.path) if f else None,
            "version": (d.version if d else f.spec.version if f else None),
            "stage": d.stage.value if d and not d.retired else ("retired" if d else None),
            "deployed_by": d.deployed_by if d else None,
            "file_matches_deployed": (f.file_sha256 == d.file_sha256) if f and d else None,
            "model_sha256": f.spec.model.sha256 if f else (d.model_sha256 if d else None),
        })
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="pipelines")
    for col in ("name", "version", "stage", "file matches", "deployed by", "file"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["version"] or "", r["stage"] or "not deployed",
                      "" if r["file_matches_deployed"] is None
                      else ("yes" if r["file_matches_deployed"] else "NO: redeploy"),
                      r["deployed_by"] or "", r["file"] or "")
    out.print(table)


@pipelines_app.command("deploy")
def pipelines_deploy(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    stage: Annotated[Stage, typer.Option(help="Initial stage.")] = Stage.STAGING,
    why: Annotated[str | None, typer.Option(help="Why (recorded in the log).")] = None,
    as_user: AsUser = None,
    password_file: PasswordFile = None,
) -> None:
    """Validate FILE (model hash included) and record its deployment with the file's hash
    and text: running receivers accept its AE title and workers run it, without a
    restart. The same file again changes nothing."""
    try:
        loaded = load_pipeline(file)
    except EngineError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(3) from None
    who = _signed_in(ctx, as_user, password_file)
    ev = deployed_event(loaded, actor=who.actor, reason=why, stage=stage)

    async def go(bus: EventBus) -> Any:
        current = (await _fold(bus)).get(loaded.name)
        if current is not None and not current.retired and (
                current.file_sha256 == loaded.file_sha256):
            return current  # the same file again: nothing changes, nothing is recorded
        await bus.publish_many([*who.events(), ev])
        return None

    same = _run(ctx, go)
    if same is not None:
        out.print(f"{loaded.name}: this file (sha256 {loaded.file_sha256[:12]}) is already "
                  f"deployed, in {same.stage.value}: nothing changed (a stage change is "
                  "`lastmile pipelines stage`)")
        return
    ae = f", AE title {loaded.spec.ae_title}" if loaded.spec.ae_title else ""
    out.print(f"deployed {loaded.name} {loaded.spec.version} in {stage.value}{ae} "
              f"(file sha256 {loaded.file_sha256[:12]}, model {loaded.spec.model.sha256[:12]}); "
              "running services take it from the log")


@pipelines_app.command("stage")
def pipelines_stage(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    to: Annotated[Stage, typer.Argument(help="staging | silent | validation | clinical")],
    why: Annotated[str, typer.Option(help="Why (recorded in the log).")],
    as_user: AsUser = None,
    password_file: PasswordFile = None,
) -> None:
    """Move a deployed pipeline to another stage; the event records who and why."""
    who = _signed_in(ctx, as_user, password_file)

    async def go(bus: EventBus) -> str:
        state = await _fold(bus)
        if name not in state:
            raise typer.BadParameter(f"pipeline {name} is not deployed")
        ev = stage_changed_event(state[name], to, actor=who.actor, reason=why)
        await bus.publish_many([*who.events(), ev])
        return f"{name}: {ev.from_stage.value} -> {ev.to_stage.value}"

    out.print(_run(ctx, go))


@pipelines_app.command("retire")
def pipelines_retire(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    why: Annotated[str, typer.Option(help="Why (recorded in the log).")],
    as_user: AsUser = None,
    password_file: PasswordFile = None,
) -> None:
    """Retire a pipeline: workers stop running it (recorded with who and why)."""
    who = _signed_in(ctx, as_user, password_file)

    async def go(bus: EventBus) -> str:
        state = await _fold(bus)
        if name not in state or state[name].retired:
            raise typer.BadParameter(f"pipeline {name} is not deployed")
        await bus.publish_many([*who.events(),
                                retired_event(state[name], actor=who.actor, reason=why)])
        return f"retired {name}"

    out.print(_run(ctx, go))


@pipelines_app.command("reference")
def pipelines_reference(
    readme: Annotated[Path | None, typer.Option(
        help="Write the reference into FILE between its reference markers (engine/README.md) "
             "instead of printing it.")] = None,
) -> None:
    """The operator and pipeline-file reference as Markdown, generated from the code:
    every operator and parameter (type, unit, default, meaning) and every key of the
    file (engine/README.md holds the same)."""
    from engine import reference

    text = reference.markdown()
    if readme is None:
        print(text, end="")
        return
    try:
        readme.write_text(reference.replace_section(readme.read_text(encoding="utf-8"), text),
                          encoding="utf-8")
    except (OSError, ValueError) as exc:
        err.print(f"[red]{readme}: {exc}[/]")
        raise typer.Exit(1) from None
    out.print(f"{readme}: reference written")
