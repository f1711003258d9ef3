"""`lastmile demo`: everything `lastmile up` runs (the supervisor and services), fed by
the demo (``demo/``: synthetic studies, simulated people, the summary), imported when the
command runs."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Annotated

import typer

from lastmile.cli_common import err, out, settings_of
from lastmile.settings import Settings

if TYPE_CHECKING:
    from demo.run import DemoOptions
    from events.jetstream import EventBus



def demo_main(settings: Settings, options: DemoOptions) -> int:
    """Start NATS and the services like `lastmile up`, run the demo, stay up (or not)."""
    from demo.run import (
        DemoError,
        prepare_blinded_study,
        prepare_unblinding_key,
        run_demo,
        write_unblinding_key,
    )
    from demo.summary import ReadModelReader, print_summary, wait_projector
    from lastmile import services_dashboards
    from lastmile.runtime import Supervisor, embedded_server
    from lastmile.services import services_for

    # the dashboard process inherits this: without a users file, pages open as the demo
    # viewer (reader, QC and governance) instead of asking for a sign-in
    os.environ.setdefault("LASTMILE_DEMO", "1")
    # and the demo's own unblinding key (written as the LTS results arrive), unless the
    # site names its own: blinded reads then show their sources, not "(unknown key)"
    os.environ.setdefault("LASTMILE_UNBLINDING_KEY", str(prepare_unblinding_key(settings)))
    # and its blinded LTS study (salt, readers, sources) for the Blinded reading page
    os.environ.setdefault("LASTMILE_BLINDED_STUDY", str(prepare_blinded_study(settings)))
    services = services_for(settings)
    if not options.dashboard:
        services = [s for s in services if not isinstance(s, services_dashboards.DashboardService)]
    url = f"http://127.0.0.1:{settings.dashboard_port}" if options.dashboard else None
    status = {"code": 0}

    async def demo(bus: EventBus, stop: asyncio.Event) -> None:
        try:
            result = await run_demo(bus, settings, options)
            reader = ReadModelReader(settings)
            try:
                seq = await wait_projector(bus, reader)
                key = await write_unblinding_key(bus, settings)
                rows = await reader.read("summary", key)
            finally:
                await asyncio.to_thread(reader.close)
            print_summary(rows, result, url)
            out.print(f"read model at event #{seq}")
        except DemoError as exc:
            err.print(f"[red]demo:[/] {exc}")
            status["code"] = 1
            stop.set()
            return
        except Exception as exc:  # noqa: BLE001 - the demo must stop, not hang, on any error
            err.print(f"[red]demo failed:[/] {type(exc).__name__}: {exc}")
            status["code"] = 1
            stop.set()
            return
        if options.exit_when_done:
            stop.set()
        else:
            out.print("Lastmile stays up; Ctrl-C stops everything.")

    async def run() -> None:
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        async def ready(bus: EventBus) -> None:
            seq = await bus.last_sequence()
            out.print(f"[green]Lastmile is up[/] (stream {bus.settings.stream} at event "
                      f"#{seq}); running the demo")
            tasks.append(asyncio.create_task(demo(bus, stop), name="demo"))

        await Supervisor(settings, services, on_ready=ready).run(stop)
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if settings.embedded_nats:
        with embedded_server(settings) as server:
            out.print(f"embedded nats-server on {server.url} (data {settings.state_dir / 'nats'})")
            asyncio.run(run())
    else:
        asyncio.run(run())
    out.print("stopped cleanly")
    return status["code"]


def demo_command(
    ctx: typer.Context,
    patients: Annotated[int, typer.Option(min=1, help="Synthetic patients (each: BTS MR "
                                          "at 3 time points, an LTS CT, an HFD exam).")] = 4,
    seed: Annotated[int, typer.Option(help="Same seed, same studies and events.")] = 7,
    weeks: Annotated[int, typer.Option(min=1, help="Study dates spread over this many "
                                       "weeks.")] = 4,
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard",
                                               help="Do not start the dashboard.")] = False,
    exit_when_done: Annotated[bool, typer.Option("--exit-when-done",
                                                 help="Stop after the summary.")] = False,
) -> None:
    """Start everything (`lastmile up`), send synthetic studies to the three pipelines,
    simulate QC and readers, print a summary; stays up until Ctrl-C."""
    from demo.run import DemoOptions

    settings = settings_of(ctx)
    code = demo_main(settings, DemoOptions(patients=patients, seed=seed, weeks=weeks,
                                           dashboard=not no_dashboard,
                                           exit_when_done=exit_when_done))
    if code:
        raise typer.Exit(code)
