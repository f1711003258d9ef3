"""`lastmile projections rebuild` and `lastmile metrics`: the DuckDB read models and the
governance metrics read from them."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from lastmile.cli_common import err, out, settings_of
from projections.errors import ProjectionsError

if TYPE_CHECKING:  # DuckDB, Arrow and NumPy load when a command reads the model
    from projections.stats import Stat

projections_app = typer.Typer(help="The DuckDB read models folded from the event log.",
                              no_args_is_help=True)


@projections_app.command("rebuild")
def rebuild_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Drop every read-model table and fold the whole log again from the first event."""
    from lastmile.runtime import open_bus, read_model_lock
    from projections.duckdb_store import ProjectionStore
    from projections.projector import rebuild

    settings = settings_of(ctx)

    async def run() -> tuple[int, dict[str, int], int]:
        async with open_bus(settings) as bus:
            with read_model_lock(settings), ProjectionStore(settings.duckdb_path) as store:
                n = await rebuild(bus, store)
                return n, store.counts(), store.checkpoint()

    try:
        n, counts, checkpoint = asyncio.run(run())
    except ProjectionsError as exc:
        err.print(f"[red]projections:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"events": n, "checkpoint": checkpoint, "rows": counts}))
        return
    out.print(f"rebuilt {settings.duckdb_path} from {n} events (up to #{checkpoint}): "
              + ", ".join(f"{k} {v}" for k, v in counts.items() if v))


def _stat(s: Stat) -> str:
    if s.value is None:
        return s.reason or "not enough data"
    if s.low is None or s.high is None:
        return f"{s.value:.3f} (n={s.n})"
    return f"{s.value:.3f} [{s.low:.3f}-{s.high:.3f}] n={s.n}"


def metrics_command(
    ctx: typer.Context,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    subgroups: Annotated[bool, typer.Option(help="Agreement by scanner, site, sex, age band."
                                            )] = True,
) -> None:
    """Governance metrics from the read model (turnaround, runtime, outcomes, agreement,
    drift), each with its 95% CI or "not enough data"."""
    from projections import metrics as M
    from projections.config import ProjectionsConfig
    from projections.duckdb_store import read_only
    from projections.report import all_metrics

    settings = settings_of(ctx)
    config = ProjectionsConfig.from_env()
    try:
        with read_only(settings.duckdb_path) as con:
            result = all_metrics(con, pipeline=pipeline, positive=config.positive,
                                 unblinding=config.unblinding(),
                                 drift_threshold=config.drift_threshold,
                                 baseline_weeks=config.drift_baseline_weeks,
                                 subgroups=subgroups)
    except ProjectionsError as exc:
        err.print(f"[red]projections:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(M.jsonable(result), indent=1))
        return
    _print_metrics(result)


def _print_metrics(r: dict[str, Any]) -> None:
    from projections.drift import describe_drift

    (seq, events), = r["checkpoint"] or [(0, 0)]
    out.print(f"read model at event #{seq} ({events} events folded)")
    t = Table(title="outcomes per pipeline")
    for col in ("pipeline", "finished", "in flight", "success", "failure", "skip",
                "redeliveries", "dead letters"):
        t.add_column(col, overflow="fold")
    for o in r["outcomes"]:
        t.add_row(o.pipeline, str(o.finished), str(o.in_flight), _stat(o.success_rate),
                  _stat(o.failure_rate), _stat(o.skip_rate), str(o.redeliveries),
                  str(o.dead_letters))
    out.print(t)
    t = Table(title="runtime (s) per pipeline and model version")
    for col in ("pipeline", "version", "n", "mean", "p50", "p90", "target (pipeline file)",
                "share <= target"):
        t.add_column(col, overflow="fold")
    for x in r["runtime"]:
        t.add_row(x.pipeline, x.model_version, str(x.n), f"{x.mean_s:.1f}", f"{x.p50_s:.1f}",
                  f"{x.p90_s:.1f}", "none" if x.threshold_s is None else f"{x.threshold_s:.0f} s",
                  _stat(x.under_threshold))
    out.print(t)
    t = Table(title="agreement (AI vs reference standard)")
    for col in ("pipeline", "readers", "cases", "AI vs readers (kappa)", "Fleiss",
                "sensitivity", "specificity", "PPV", "NPV", "ROC AUC"):
        t.add_column(col, overflow="fold")
    for p, parts in r["agreement"].items():
        a = parts["overall"]
        kap = "; ".join(f"{k}: {_stat(v)}" for k, v in a.ai_vs_reader.items())
        acc = a.accuracy
        cells = [_stat(s) for s in (acc.sensitivity, acc.specificity, acc.ppv, acc.npv)] \
            if acc else ["not enough data: no reference"] * 4
        t.add_row(p, str(len(a.readers)), str(a.reference_cases), kap, _stat(a.fleiss), *cells,
                  _stat(a.auc))
    out.print(t)
    for p, rows in r["blinded_reads"].items():
        t = Table(title=f"blinded reads ({p})")
        for col in ("source", "reads", "accepted", "confidence"):
            t.add_column(col, overflow="fold")
        for b in rows:
            t.add_row(b.source, str(b.reads), _stat(b.accepted), _stat(b.confidence))
        out.print(t)
    if r["qc"]:
        out.print("QC rejection: " + "; ".join(f"{q.pipeline} {_stat(q.rejection_rate)}"
                                               for q in r["qc"]))
    for d in r["dice"]:
        out.print(f"Dice {d.pipeline}/{d.label}: {_stat(d.mean)}")
    drift = r.get("drift")
    if drift and drift["window"] is None:
        out.print(f"drift: {drift['note']}")
    elif drift:
        note = f" ({drift['note']})" if drift.get("note") else ""
        w = drift["window"]
        out.print(f"drift {w[0]:%Y-%m-%d %H:%M:%S} to {w[1]:%H:%M:%S} vs baseline from "
                  f"{drift['baseline'][0]:%Y-%m-%d %H:%M:%S}: "
                  + describe_drift(drift["rows"]) + note)
    out.print("(--json for every metric, turnaround per week and subgroups)")
