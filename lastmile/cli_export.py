"""`lastmile export`: a de-identified retraining set for one pipeline (see
``retraining.writer`` for the layout and ``retraining.dicom_deid`` for the profile)."""

from __future__ import annotations

import asyncio
import json
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from lastmile.cli_common import EXIT_FAILED, EXIT_NOT_FOUND, err, out, settings_of

EXIT_USAGE = 2


def _yyyymmdd(text: str | None, option: str) -> str | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text).strftime("%Y%m%d")
    except ValueError:
        err.print(f"{option} {text!r}: expected a date as YYYY-MM-DD")
        raise typer.Exit(EXIT_USAGE) from None


def export_command(
    ctx: typer.Context,
    pipeline: Annotated[str, typer.Option(help="The pipeline whose results to export.")],
    out_dir: Annotated[Path, typer.Option("--out", help="A new (or empty) folder.")],
    stage: Annotated[list[str] | None, typer.Option(
        help="Only runs requested in this stage (repeatable): staging, silent, validation, "
             "clinical.")] = None,
    since: Annotated[str | None, typer.Option(help="Studies dated on or after YYYY-MM-DD.")]
    = None,
    until: Annotated[str | None, typer.Option(help="Studies dated on or before YYYY-MM-DD.")]
    = None,
    reviewed_only: Annotated[bool, typer.Option(
        "--reviewed-only", help="Only results a reader reviewed or corrected.")] = False,
    disagreements_only: Annotated[bool, typer.Option(
        "--disagreements-only", help="Only results a reader disagreed with or corrected "
        "(Dice < 1).")] = False,
    dataset_id: Annotated[int | None, typer.Option(
        help="nnU-Net dataset id (default: bts 501, lts 502, hfd 503).", min=1, max=999)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
) -> None:
    """Write a de-identified retraining set: DICOM (PS3.15 basic profile, modified dates,
    clean descriptors), NIfTI with an nnU-Net v2 dataset.json and a MONAI datalist, the
    event tables, and a manifest of what was removed."""
    from events.catalogue import Stage
    from events.deidentify import export_key
    from events.errors import CodecError
    from lastmile.runtime import open_bus
    from retraining.selection import RetrainingFilter
    from retraining.writer import RetrainingError, write_retraining_set

    settings = settings_of(ctx)
    try:
        stages = frozenset(Stage(s) for s in stage or [])
    except ValueError:
        err.print(f"--stage {stage}: the stages are "
                  + ", ".join(s.value for s in Stage))
        raise typer.Exit(EXIT_USAGE) from None
    flt = RetrainingFilter(pipeline=pipeline, stages=stages,
                           since=_yyyymmdd(since, "--since"), until=_yyyymmdd(until, "--until"),
                           reviewed_only=reviewed_only, disagreements_only=disagreements_only)

    async def read() -> list:  # type: ignore[type-arg]
        async with open_bus(settings) as bus:
            return [(seq, ev) async for seq, ev, _ in bus.read()
                    if not isinstance(ev, CodecError)]

    events = asyncio.run(read())
    try:
        result = write_retraining_set(
            events, instances_dir=settings.instances_dir, results_dir=settings.results_dir,
            out=out_dir, key=export_key(settings.secret()), flt=flt, dataset_id=dataset_id)
    except RetrainingError as exc:
        err.print(f"[red]export:[/] {exc}")
        raise typer.Exit(EXIT_NOT_FOUND if "passes the filter" in str(exc)
                         else EXIT_FAILED) from None
    summary = {"path": str(result.root), "cases": result.cases,
               "dicom_files": result.dicom_files, "nifti_cases": result.nifti_cases,
               "events": result.events, "skipped_nifti": result.skipped,
               "nnunet": str(result.nnunet_dir) if result.nnunet_dir else None,
               "datalist": str(result.datalist) if result.datalist else None}
    if as_json:
        print(json.dumps(summary))
        return
    out.print(f"wrote {result.cases} {pipeline} cases to {result.root}: "
              f"{result.dicom_files} de-identified DICOM files, {result.nifti_cases} NIfTI "
              f"cases, {result.events} events; see manifest.json")
    for case, why in result.skipped.items():
        out.print(f"  {case}: no NIfTI ({why})")
