"""``lastmile check FOLDER``: try a sample of a site's own archive on a running Lastmile.

Registered in ``lastmile/cli.py`` with one line; the sender and the log reader are
imported inside the command so that ``lastmile --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from lastmile.cli_common import EXIT_FAILED, err, out, settings_of

if TYPE_CHECKING:
    from sitecheck.check import CheckReport, StudyReport

EXIT_USAGE = 2


def _short(uid: str, keep: int = 18) -> str:
    return uid if len(uid) <= keep else "…" + uid[-(keep - 1):]


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _rows(study: StudyReport) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    d = study.as_dict()
    sent = d["sent"]
    files = f"{sent.get('Success', 0) + sent.get('Warning', 0)}/{d['files']}"
    if d["converted"]:
        files += f" ({d['converted']} converted)"
    refused_here = sum(d["rejected"].values()) + sent.get("Not sent", 0)
    notes = [f"{refused_here} refused at the receiver"] if refused_here else []
    if d["retried_runs"]:
        notes.append(f"{d['retried_runs']} run(s) retried")
    if not d["pipelines"]:
        reason = "; ".join([*notes, d["reason"] or ""]).strip("; ")
        return [(_short(d["study_uid"]), d["called_ae"], files, "", "", d["result"] or "",
                 reason, _s(d["send_s"]), "", "")]
    for p in d["pipelines"]:
        completed = p["completed_reason"] or ""
        result = p["result"]
        if p["superseded_runs"]:
            result += f" (supersedes {p['superseded_runs']})"
        if p["kinds"]:
            result += f" [{'+'.join(sorted(set(p['kinds'])))}]"
        reason = "; ".join([*notes, p["reason"] or ""]).strip("; ")
        rows.append((_short(d["study_uid"]), d["called_ae"], files, completed, p["pipeline"],
                     result, reason, _s(d["send_s"]), _s(p["completed_after_send_s"]),
                     _s(p["result_after_completed_s"])))
    return rows


def print_report(report: CheckReport) -> None:
    table = Table(title=f"lastmile check: {len(report.studies)} studies", show_lines=True)
    for col in ("study", "AE", "files sent", "completed", "pipeline", "result", "reason",
                "send s", "completed +s", "result +s"):
        table.add_column(col, overflow="fold")
    for study in report.studies:
        for row in _rows(study):
            style = ("red" if row[5].startswith(("crashed", "timed out"))
                     else "green" if row[5].startswith("valid") else None)
            table.add_row(*row, style=style)
    out.print(table)
    s = report.summary()
    results = ", ".join(f"{n} {r}" for r, n in sorted(s["results"].items()))
    studies = f"{s['studies']} stud{'y' if s['studies'] == 1 else 'ies'}"
    out.print(f"{studies}, {s['files']} files ({s['skipped_files']} skipped: not "
              f"DICOM instances) in {s['seconds']} s: {results}; {s['retried_runs']} retried "
              f"run(s), {s['crashed']} crashed, {s['timed_out']} timed out")
    for reason, n in sorted(s["refusals"].items(), key=lambda kv: -kv[1]):
        out.print(f"  refused ×{n}: {reason}")


def check_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="Folder (or file) of DICOM to send; "
                                           "searched recursively.", exists=True)],
    ae: Annotated[str | None, typer.Option(
        "--ae", help="Called AE title: a pipeline's own (LM_BTS ...) or the general one "
                     "that applies the routing rules (default: the dicom_general_ae "
                     "setting).")] = None,
    host: Annotated[str | None, typer.Option(
        help="Receiver host (default: the dicom_host setting).")] = None,
    port: Annotated[int | None, typer.Option(
        help="Receiver port (default: the dicom_port setting).")] = None,
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "LM_CHECK",
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1.0,
        help="Seconds to wait for each study's outcome after its association ended "
             "(the default routing rules wait up to 900 s for an incomplete study).")] = 960.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Send a folder of DICOM to a running Lastmile as a modality would, one association
    per study, and report each study's outcome: completion, pipeline, result (valid,
    refused with its reason, partial, superseded, no pipeline), times.

    Exits 1 when any study crashed (a run failed only after retries, or an event was
    dead-lettered) or timed out; 4 when the event log cannot be reached.
    """
    from events.jetstream import EventBus
    from sitecheck.check import run_check
    from sitecheck.folder import scan
    from sitecheck.sender import Peer

    settings = settings_of(ctx)
    found = scan(folder)
    if not found.studies:
        err.print(f"no DICOM instances under {folder} ({len(found.skipped)} other files)")
        raise typer.Exit(EXIT_USAGE)
    peer = Peer(host or settings.dicom_host, port or settings.dicom_port,
                ae or settings.dicom_general_ae, calling_ae)

    def progress(what: str, study: StudyReport) -> None:
        if as_json:
            return
        if what == "sent":
            counts = ", ".join(f"{n} {c}" for c, n in sorted(study.sent.counts().items()))
            err.print(f"sent {_short(study.study_uid)} to {peer.called_ae} "
                      f"({counts}) in {study.sent.seconds:.1f} s")
        else:
            err.print(f"done {_short(study.study_uid)}: "
                      f"{', '.join(r.value for r in study.results())}")

    async def run() -> CheckReport:
        # never the embedded server of `open_bus`: a check reads the running Lastmile's log
        bus = await EventBus.connect(settings.bus())
        try:
            return await run_check(bus, found, peer, timeout_s=timeout, on_event=progress)
        finally:
            await bus.close()

    report = asyncio.run(run())
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print_report(report)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
