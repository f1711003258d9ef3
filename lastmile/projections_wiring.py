"""Projections in the composition root: the projector service for `lastmile up`, the
`lastmile projections rebuild` and `lastmile metrics` commands, `lastmile bench projections`.

Register (one line each; see the report of issue 4):

    # lastmile/cli.py
    from lastmile.projections_wiring import (bench_projections_command, metrics_command,
                                             projections_app)
    app.add_typer(projections_app, name="projections")
    app.command("metrics")(metrics_command)
    bench_app.command("projections")(bench_projections_command)

    # lastmile/cli.py, in replay(), after exporter.close() when --to parquet DIR is given
    #   (inside the same `async with open_bus(settings) as bus:` block):
    labels = await export_labels_from_bus(bus, to[1], remapper=remapper, study_uid=study,
                                          from_sequence=from_sequence)

    # lastmile/services.py, in services_for()
    from lastmile.projections_wiring import ProjectorService
    services.append(ProjectorService(settings))

Settings of this part (environment, with defaults) are read by ``ProjectionsConfig``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from events.errors import CodecError, EventsError
from events.export import UidRemapper
from events.jetstream import EventBus
from lastmile.runtime import Service
from lastmile.settings import ConfigError, Settings
from projections import metrics as M
from projections.drift import alerts_for, drift_windows
from projections.duckdb_store import ProjectionStore, read_only
from projections.errors import ProjectionsError
from projections.export import LabelExport, export_labels
from projections.projector import Projector, rebuild
from projections.report import DEFAULT_POSITIVE, all_metrics
from projections.stats import Stat

log = logging.getLogger("lastmile.projections")
out = Console()
err = Console(stderr=True)


def _positive(text: str) -> dict[str, str]:
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    result = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"LASTMILE_POSITIVE_CLASSES: {pair!r} is not pipeline=class "
                              "(e.g. hfd=fracture,bts=progression)")
        result[name.strip()] = value.strip()
    return result


@dataclass(frozen=True)
class ProjectionsConfig:
    """This part's settings, from ``LASTMILE_*`` variables (all optional)."""

    batch_size: int = 5000  # LASTMILE_PROJECTOR_BATCH
    idle_s: float = 0.2  # LASTMILE_PROJECTOR_IDLE_S: wait when the log has nothing new
    drift_threshold: float = 0.2  # LASTMILE_DRIFT_THRESHOLD (PSI)
    drift_baseline_weeks: int = 4  # LASTMILE_DRIFT_BASELINE_WEEKS
    drift_every_s: float = 3600.0  # LASTMILE_DRIFT_EVERY_S; 0 = never check
    unblinding_key: Path | None = None  # LASTMILE_UNBLINDING_KEY: JSON/TOML label -> source
    positive: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_POSITIVE))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProjectionsConfig:
        env = os.environ if environ is None else environ

        def get(name: str, conv: Any, default: Any) -> Any:
            raw = env.get(f"LASTMILE_{name}")
            if raw is None or raw == "":
                return default
            try:
                return conv(raw)
            except ValueError:
                raise ConfigError(f"environment LASTMILE_{name}: {raw!r} is not a valid "
                                  f"{conv.__name__}") from None

        return cls(
            batch_size=get("PROJECTOR_BATCH", int, 5000),
            idle_s=get("PROJECTOR_IDLE_S", float, 0.2),
            drift_threshold=get("DRIFT_THRESHOLD", float, 0.2),
            drift_baseline_weeks=get("DRIFT_BASELINE_WEEKS", int, 4),
            drift_every_s=get("DRIFT_EVERY_S", float, 3600.0),
            unblinding_key=get("UNBLINDING_KEY", Path, None),
            positive=get("POSITIVE_CLASSES", _positive, dict(DEFAULT_POSITIVE)),
        )

    def unblinding(self) -> dict[str, str]:
        """The blinding key (blinded label -> source); kept out of the log on purpose."""
        if self.unblinding_key is None:
            return {}
        path = self.unblinding_key
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"unblinding key {path} does not exist") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"unblinding key {path}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"unblinding key {path} must map blinded labels to sources")
        return {str(k): v for k, v in data.items()}


# --------------------------------------------------------------------------- service


class ProjectorService(Service):
    """Follows the log into ``settings.duckdb_path``; raises drift alerts periodically.

    The DuckDB file is opened per batch (``keep_open=False``) so `lastmile metrics` and
    the dashboards can read it between batches.
    """

    name = "projector"

    def __init__(self, settings: Settings, config: ProjectionsConfig | None = None) -> None:
        self.settings = settings
        self.config = config or ProjectionsConfig.from_env()

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        store = ProjectionStore(self.settings.duckdb_path, keep_open=False)
        projector = Projector(store, batch_size=self.config.batch_size,
                              idle_s=self.config.idle_s)
        tasks = [asyncio.create_task(projector.follow(bus, stop), name="projector")]
        if self.config.drift_every_s > 0:
            tasks.append(asyncio.create_task(self._drift_loop(bus, store, stop),
                                             name="drift"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            store.close()

    async def _drift_loop(self, bus: EventBus, store: ProjectionStore,
                          stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.drift_every_s)
                return
            except TimeoutError:
                pass
            published = await check_drift(bus, store, self.config)
            if published:
                log.warning("drift: raised %d alert(s)", published)


async def check_drift(bus: EventBus, store: ProjectionStore, config: ProjectionsConfig,
                      now: datetime | None = None) -> int:
    """Compare last week with the baseline weeks; publish alerts not raised before."""
    baseline, window = drift_windows(now or datetime.now(UTC), config.drift_baseline_weeks)
    with store.connection() as con:
        rows = M.drift(con, baseline=baseline, window=window,
                       threshold=config.drift_threshold)
        raised = {eid for (eid,) in con.execute("SELECT event_id FROM drift_alerts").fetchall()}
    fresh = [a for a in alerts_for(rows, baseline=baseline, window=window)
             if a.event_id not in raised]
    for alert in fresh:
        await bus.publish(alert)
    return len(fresh)


async def export_labels_from_bus(bus: EventBus, directory: Path, *,
                                 remapper: UidRemapper | None = None,
                                 study_uid: str | None = None,
                                 from_sequence: int = 1) -> LabelExport:
    """For `lastmile replay --to parquet DIR [--deidentify]`: the derived labels (reviews,
    edits) per study next to the exported events, remapped with the same key."""
    events = [(seq, ev) async for seq, ev, _ in
              bus.read(study_uid=study_uid, from_sequence=from_sequence)
              if not isinstance(ev, CodecError)]
    return export_labels(events, directory, remapper)


# --------------------------------------------------------------------------- commands

projections_app = typer.Typer(help="The DuckDB read models folded from the event log.",
                              no_args_is_help=True)


@projections_app.command("rebuild")
def rebuild_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Drop every read-model table and fold the whole log again from the first event."""
    from lastmile.runtime import open_bus

    settings: Settings = ctx.obj

    async def run() -> tuple[int, dict[str, int], int]:
        async with open_bus(settings) as bus:
            with ProjectionStore(settings.duckdb_path) as store:
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
    settings: Settings = ctx.obj
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
    (seq, events), = r["checkpoint"] or [(0, 0)]
    out.print(f"read model at event #{seq} ({events} events folded)")
    t = Table(title="outcomes per pipeline")
    for col in ("pipeline", "finished", "in flight", "success", "failure", "skip",
                "redeliveries", "dead letters"):
        t.add_column(col)
    for o in r["outcomes"]:
        t.add_row(o.pipeline, str(o.finished), str(o.in_flight), _stat(o.success_rate),
                  _stat(o.failure_rate), _stat(o.skip_rate), str(o.redeliveries),
                  str(o.dead_letters))
    out.print(t)
    t = Table(title="runtime (s) per pipeline and model version")
    for col in ("pipeline", "version", "n", "mean", "p50", "p90", "share <= threshold"):
        t.add_column(col)
    for x in r["runtime"]:
        t.add_row(x.pipeline, x.model_version, str(x.n), f"{x.mean_s:.1f}", f"{x.p50_s:.1f}",
                  f"{x.p90_s:.1f}", f"{_stat(x.under_threshold)} (<= {x.threshold_s:.0f}s)")
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
            t.add_column(col)
        for b in rows:
            t.add_row(b.source, str(b.reads), _stat(b.accepted), _stat(b.confidence))
        out.print(t)
    if r["qc"]:
        out.print("QC rejection: " + "; ".join(f"{q.pipeline} {_stat(q.rejection_rate)}"
                                               for q in r["qc"]))
    for d in r["dice"]:
        out.print(f"Dice {d.pipeline}/{d.label}: {_stat(d.mean)}")
    drift = r.get("drift")
    if drift:
        alerts = [x for x in drift["rows"] if x.alert]
        out.print(f"drift {drift['window'][0]:%Y-%m-%d} week vs baseline from "
                  f"{drift['baseline'][0]:%Y-%m-%d}: "
                  + (", ".join(f"{a.pipeline}:{a.feature} PSI {a.psi:.2f}" for a in alerts)
                     or "no feature over threshold"))
    out.print("(--json for every metric, turnaround per week and subgroups)")


def bench_projections_command(
    count: Annotated[int, typer.Option(min=1000, help="Events to fold.")] = 1_000_000,
    live_rate: Annotated[float, typer.Option(help="Events/s published during the lag test."
                                             )] = 2000.0,
    live_seconds: Annotated[float, typer.Option(help="Length of the lag test.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fold N synthetic events from a real JetStream stream into DuckDB; time every metric
    query; measure the projector's lag under live load."""
    from bench.projections import run_projections_bench

    try:
        result = asyncio.run(run_projections_bench(count, live_rate=live_rate,
                                                   live_s=live_seconds))
    except EventsError as exc:
        err.print(f"[red]NATS:[/] {exc}")
        raise typer.Exit(4) from None
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    t = Table(title=f"bench projections: {result.events:,} events -> {result.rows:,} rows "
                    f"({result.duckdb_mb} MB)")
    t.add_column("figure")
    t.add_column("value")
    t.add_row("fold + write (events/s)", f"{result.fold_events_per_s:,.0f}")
    t.add_row("end to end from JetStream (events/s)", f"{result.end_to_end_events_per_s:,.0f}")
    t.add_row("publish (s)", f"{result.publish_s}")
    for name, ms in result.queries_ms.items():
        t.add_row(f"query {name} (ms, warm)", f"{ms}")
    t.add_row(f"lag p50/p99/max at {result.live_rate:.0f} events/s (s)",
              f"{result.lag_p50_s} / {result.lag_p99_s} / {result.lag_max_s}")
    for target, verdict in result.targets.items():
        t.add_row(target, verdict)
    out.print(t)
