"""`lastmile pipelines from-bundle DIR`: a MONAI bundle folder -> a pipeline file
(``engine.bundle``), checked by loading it as a deployment would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lastmile.cli_common import err, out


def from_bundle_command(
    bundle: Annotated[Path, typer.Argument(help="MONAI bundle folder (configs/, models/)")],
    output: Annotated[Path | None, typer.Option("--out", "-o",
                                                help="pipeline file to write "
                                                     "(default: DIR/lastmile.yaml)")] = None,
) -> None:
    """Write a pipeline file from a MONAI bundle; name what cannot be mapped.

    The bundle's own transforms, inferer, labels and model (configs/metadata.json,
    configs/inference.json, models/model.ts) become the file's operators and model;
    what cannot be mapped is named here and kept as comments in the file."""
    from engine.bundle import from_bundle
    from engine.errors import SpecError
    from engine.spec import load_pipeline

    target = output or bundle / "lastmile.yaml"
    try:
        conversion = from_bundle(bundle, target)
    except SpecError as exc:
        err.print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    target.write_text(conversion.text, encoding="utf-8")
    for line in conversion.unmapped:
        err.print(f"not mapped: {line}", markup=False, soft_wrap=True)
    for line in conversion.notes:
        err.print(f"note: {line}", markup=False, soft_wrap=True)
    try:
        loaded = load_pipeline(target)
    except SpecError as exc:
        err.print(f"{target} was written but does not load:\n{exc}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"{target}: pipeline {loaded.name} {loaded.spec.version}, "
              f"{len(loaded.spec.operators)} operators, model {loaded.model_path.name} "
              f"(sha256 {loaded.spec.model.sha256[:12]}…); deploy with "
              f"`lastmile pipelines deploy {target}`", markup=False, soft_wrap=True)
