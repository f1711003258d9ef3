"""`lastmile bench ...`: each command imports its benchmark (``bench/``) when it runs, so
``lastmile --help`` stays fast and nothing below the command line imports ``bench``."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from events.errors import EventsError
from lastmile.cli_common import err, out

bench_app = typer.Typer(help="Benchmarks against real servers, with a peer in the same run.",
                        no_args_is_help=True)


@bench_app.command("events")
def bench_events(
    count: Annotated[int, typer.Option(min=1000, help="Events to publish and consume.")] = 100_000,
    sync: Annotated[str, typer.Option(help='JetStream fsync: "2m" (server default) or '
                                      '"always".')] = "2m",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Publish + consume N events on a real JetStream file store; peer: plain nats-py."""
    from bench.events import run_events_bench

    result = asyncio.run(run_events_bench(count, sync))
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    table = Table(title=f"bench events: {count} events of ~{result.event_bytes} B, sync {sync}")
    for col in ("path", "publish /s", "consume /s"):
        table.add_column(col)
    table.add_row("lastmile (codec + adapter)", f"{result.lastmile_publish_per_s:,.0f}",
                  f"{result.lastmile_consume_per_s:,.0f}")
    table.add_row("plain nats-py loop (peer)", f"{result.plain_publish_per_s:,.0f}",
                  f"{result.plain_consume_per_s:,.0f}")
    table.add_row("plain nats-py + Nats-Msg-Id", f"{result.plain_dedupe_publish_per_s:,.0f}",
                  f"{result.plain_dedupe_consume_per_s:,.0f}")
    table.add_row("ratio lastmile / plain", f"{result.publish_ratio:.2f}",
                  f"{result.consume_ratio:.2f}")
    out.print(table)


@bench_app.command("ingest")
def bench_ingest(
    count: Annotated[int, typer.Option(min=10, help="CT instances per run.")] = 200,
    studies: Annotated[int, typer.Option(min=1, help="Studies for completion latency.")] = 20,
    peers: Annotated[bool, typer.Option(help="Also measure dcmtk storescp and Orthanc.")] = True,
    senders: Annotated[bool, typer.Option(
        help="Also the completion outcome per sender (split, paused, aborted, crash).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """C-STORE 200 CT instances with dcmtk storescu into our SCP, storescp and Orthanc;
    then one study sent five ways and what completion made of each."""
    from bench.completion import run_completion_bench
    from bench.ingest import run_ingest_bench

    result = asyncio.run(run_ingest_bench(count=count, studies=studies, peers=peers))
    outcomes = asyncio.run(run_completion_bench()) if senders else None
    if as_json:
        print(json.dumps({**asdict(result),
                          "senders": asdict(outcomes) if outcomes else None}, indent=1))
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
    if outcomes is not None:
        _print_senders(outcomes)


def _print_senders(outcomes: Any) -> None:
    table = Table(title="completion per sender (one LTS study each; goal: one current "
                  "result, equal to the single-association one)")
    for col in ("sender", "instances", "completed", "amended", "results", "superseded",
                "current", "reason", "partial", "= single", "last instance -> completed s"):
        table.add_column(col)
    for o in outcomes.outcomes:
        table.add_row(o.sender, str(o.instances), str(o.completions), str(o.amendments),
                      str(o.results), str(o.superseded), str(o.current_results),
                      o.reason or "-", str(o.partial), str(o.equal_to_single),
                      "-" if o.last_instance_to_completed_s is None
                      else f"{o.last_instance_to_completed_s:.2f}")
    out.print(table)
    for note in outcomes.notes:
        out.print(f"note: {note}")


@bench_app.command("e2e")
def bench_e2e(
    studies: Annotated[int, typer.Option(min=1, help="Studies per pipeline.")] = 10,
    pipelines: Annotated[str, typer.Option(
        help="Comma-separated rows: hfd,bts,lts (reference files), bts-torch (BTS on the "
        "torch runtime), bts-cascade (locator + BTS); the last two need torch."
    )] = "hfd,bts,lts,bts-torch,bts-cascade",
    via: Annotated[str, typer.Option(help="auto | dicom (storescu -> ingest SCP) | feed.")]
    = "auto",
    peer: Annotated[bool, typer.Option(
        help="3D rows: also MONAI's own inferer on the same array with the same model.")]
    = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """End to end per pipeline: study completed -> result published, per-stage p50/p90;
    3D segmentations split into model compute, MONAI inferer overhead and platform."""
    from bench.e2e import STAGES, run_e2e_bench

    result = asyncio.run(run_e2e_bench(studies, tuple(p.strip() for p in pipelines.split(",")),
                                       via, peer))
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    for name, r in result.pipelines.items():
        table = Table(title=f"bench e2e {name} on {r['runtime']}: {r['studies']} studies "
                      "(seconds)")
        table.add_column("stage")
        table.add_column("p50")
        table.add_column("p90")
        for s in STAGES:
            table.add_row(s, f"{r['p50_s'][s]:.3f}", f"{r['p90_s'][s]:.3f}")
        table.add_row("platform overhead (total - inference)",
                      f"{r['platform_overhead_p50_s']:.3f}",
                      f"share {r['platform_overhead_share_p50']:.0%}")
        for part, v in (r["split_s"] or {}).items():
            table.add_row(f"split: {part.replace('_', ' ')}", f"{v['p50']:.3f}",
                          f"{v['p90']:.3f}")
        peer_row = r.get("monai_peer")
        if peer_row:
            for part in ("inferer", "model_compute", "monai_inferer_overhead"):
                table.add_row(f"peer MONAI by hand: {part.replace('_', ' ')}",
                              f"{peer_row[part]['p50']:.3f}", f"{peer_row[part]['p90']:.3f}")
        out.print(table)
    for note in result.notes:
        out.print(f"- {note}")


@bench_app.command("projections")
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


@bench_app.command("dashboards")
def bench_dashboards_command(
    count: Annotated[int, typer.Option(min=1000, help="Synthetic events to fold.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(min=1, help="Warm loads per page.")] = 3,
    screenshots: Annotated[Path | None, typer.Option(
        help="Save a screenshot of each page (after its last load) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fold N synthetic events, start the dashboard, and time each page's warm load in
    headless Chromium (target: < 1.5 s per page)."""
    from bench.dashboards import run_dashboards_bench

    result = run_dashboards_bench(count, repeats, screenshots)
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    t = Table(title=f"bench dashboards: {result.events:,} events folded in {result.fold_s} s "
                    f"({result.duckdb_mb} MB)")
    for col in ("page", "cold (ms)", "warm median (ms)", "warm runs (ms)"):
        t.add_column(col)
    for name in result.warm_ms:
        t.add_row(name, f"{result.cold_ms[name]:.0f}", f"{result.warm_median_ms[name]:.0f}",
                  ", ".join(f"{v:.0f}" for v in result.warm_ms[name]))
    out.print(t)
    out.print(f"{result.target}: {result.verdict}")


@bench_app.command("review")
def bench_review_command(
    opens: Annotated[int, typer.Option(min=3, help="Warm case opens to time.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Seed real pipeline results, start the pages, and time warm case loads (deep link
    to drawn image) and the clicks of an "agree" in headless Chromium."""
    from bench.review import run_review_bench

    result = run_review_bench(opens)
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    t = Table(title="bench review: case page (BTS, deep link, signed in)")
    for col in ("opens", "cold (ms)", "warm p50 (ms)", "warm p90 (ms)", "clicks to agree"):
        t.add_column(col)
    t.add_row(str(result.case_loads), f"{result.cold_ms:.0f}", f"{result.warm_p50_ms:.0f}",
              f"{result.warm_p90_ms:.0f}", str(result.agree_clicks))
    out.print(t)
    out.print(f"{result.target}: {result.verdict}. Peer: {result.peer}.")


@bench_app.command("gpu")
def bench_gpu_command(
    bundle: Annotated[Path, typer.Option("--out", help="Folder for the bundle (TorchScript "
                                         "programs, "
                                      "inputs, CPU reference outputs, gpu_check.py).")
                   ] = Path("gpu-bundle"),
    run: Annotated[bool, typer.Option(help="Also run the check with this interpreter "
                                      "(CPU here; CUDA where torch sees a GPU).")] = True,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per CUDA mode.")] = 20,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")
                        ] = None,
) -> None:
    """GPU check: TorchScript models on CPU, CUDA fp32 and CUDA fp16, compared with this
    machine's CPU outputs, with latency per model. Needs torch (the train extra).

    On a GPU host with only Python, PyTorch and numpy: copy the bundle folder there and
    run `python3 BUNDLE/gpu_check.py BUNDLE --json result.json`."""
    try:
        from bench.gpu import build_bundle, run_check
        manifest = build_bundle(bundle)
    except ImportError as exc:
        err.print(f"bench gpu needs torch (pip install -e '.[train]'): {exc}")
        raise typer.Exit(1) from None
    out.print(f"bundle: {bundle} ({len(manifest['models'])} models: "
               f"{', '.join(m['name'] for m in manifest['models'])}); on a GPU host run: "
               f"python3 {bundle}/gpu_check.py {bundle} --json result.json", highlight=False)
    if run:
        raise typer.Exit(run_check(bundle, runs=runs, json_out=json_out))


@bench_app.command("cli")
def bench_cli_command(
    runs: Annotated[int, typer.Option(min=2, help="Fresh processes per command.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Start-up of the command line: `lastmile --help` and `lastmile pipelines --help`
    in fresh processes against `python -c pass` (the interpreter's floor), p50/p90.

    Also names the heavy packages each imported. Target: none, and `lastmile --help`
    within 1 s."""
    from bench.cli import run_cli_bench

    result = run_cli_bench(runs)
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    t = Table(title=f"bench cli: {result.runs} fresh processes each, interleaved "
                    f"(Python {result.python})")
    for col in ("command", "p50 (s)", "p90 (s)", "heavy packages imported"):
        t.add_column(col)
    for name, p50 in result.p50_s.items():
        heavy = result.heavy.get(name)
        t.add_row(name, f"{p50:.3f}", f"{result.p90_s[name]:.3f}",
                  "" if heavy is None else (", ".join(heavy) or "none"))
    out.print(t)
    out.print(f"{result.target}: {result.verdict}. 1-min load {result.load_average[0]:.1f} at "
              f"start, {result.load_average[1]:.1f} at end (noisy on a busy machine).")
