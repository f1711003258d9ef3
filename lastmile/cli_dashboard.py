"""`lastmile dashboard`: only the pages, on the read model, until Ctrl-C."""

from __future__ import annotations

import time

import typer

from lastmile.cli_common import err, out, settings_of


def dashboard_command(ctx: typer.Context) -> None:
    """Run only the governance dashboard (Streamlit) on the read model, until Ctrl-C."""
    from dashboards.process import DashboardError, PagesProcess

    settings = settings_of(ctx)
    if not settings.duckdb_path.exists():
        err.print(f"no read model at {settings.duckdb_path}: run `lastmile up` or "
                  "`lastmile projections rebuild` first")
        raise typer.Exit(5)
    proc = PagesProcess(settings.duckdb_path, settings.bus("pages"), settings.dashboard_port,
                        state_dir=settings.state_dir)  # the front, Streamlit behind it
    try:
        proc.start()
    except DashboardError as exc:
        err.print(f"[red]dashboard:[/] {exc}")
        raise typer.Exit(1) from None
    out.print(f"dashboard on {proc.url} (Ctrl-C stops)")
    try:
        while proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        proc.stop()
