"""`lastmile route test FILE...`: which routing rules and pipelines a DICOM file would
match, and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ingest.errors import IngestError
from lastmile.cli_common import EXIT_CONFIG, EXIT_FAILED, err, out
from lastmile.settings import Settings

if TYPE_CHECKING:  # pydicom and the receiver's rules load when a command runs
    from ingest.rules import RuleSet
    from ingest.rules_file import RulesFile

route_app = typer.Typer(help="Routing rules: which pipelines a file would go to.",
                        no_args_is_help=True)


def explain(rules: RuleSet, path: Path, called_ae: str | None) -> dict[str, object]:
    """Which rules and pipelines a file matches, and why (pure apart from reading it)."""
    import pydicom

    from dicom_rules.conditions import evaluate
    from ingest.dataset import tag_values
    from ingest.rules import route

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    tags = tag_values(ds, rules.tags())
    by_ae = rules.ae_titles().get(called_ae or "")
    decision = route(rules, tags)
    per_rule = []
    for rule in rules.rules:
        if rule.when is None:
            per_rule.append({"rule": rule.id, "enabled": rule.enabled, "fallback": True,
                             "matched": rule.id in decision.rule_ids, "why": "fallback"})
            continue
        ok, why = evaluate(rule.when, tags)
        per_rule.append({"rule": rule.id, "enabled": rule.enabled, "fallback": rule.fallback,
                         "matched": ok and rule.enabled, "why": why})
    return {
        "file": str(path),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "called_ae": called_ae,
        "pipelines": [by_ae] if by_ae else list(decision.pipelines),
        "decided_by": f"AE title {called_ae}" if by_ae else "rules",
        "matched_rules": list(decision.rule_ids),
        "fallback": decision.fallback,
        "rules": per_rule,
    }


@route_app.command("test")
def route_test(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="DICOM files", exists=True,
                                                dir_okay=False)],
    rules_file: Annotated[Path | None, typer.Option(
        "--rules", help="Rules YAML [LASTMILE_ROUTING_RULES, else the shipped example]")] = None,
    called_ae: Annotated[str | None, typer.Option(
        help="Pretend the file arrived on this AE title (LM_BTS ... go straight to their "
             "pipeline).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Which rules and pipelines each file would match, and why."""
    import pydicom

    from ingest.rules import EXAMPLE_RULES
    from lastmile.services_ingest import rules_path

    settings: Settings | None = ctx.obj if isinstance(ctx.obj, Settings) else None
    path = rules_file or (rules_path(settings) if settings else EXAMPLE_RULES)
    rules = open_rules(path)()
    results = []
    for f in files:
        try:
            results.append(explain(rules, f, called_ae))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            results.append({"file": str(f), "error": f"not readable as DICOM: {exc}"})
    if as_json:
        print(json.dumps({"rules_file": str(path), "results": results}, indent=1))
    else:
        out.print(f"rules: {path}")
        for res in results:
            if "error" in res:
                out.print(f"[red]{res['file']}[/]: {res['error']}")
                continue
            pipes = ", ".join(res["pipelines"]) or "(none: stored only)"  # type: ignore[arg-type]
            out.print(f"[bold]{res['file']}[/] -> [green]{pipes}[/] ({res['decided_by']})")
            table = Table(show_header=True)
            for col in ("rule", "enabled", "matched", "why"):
                table.add_column(col, overflow="fold")
            for row in res["rules"]:  # type: ignore[attr-defined]
                table.add_row(row["rule"], "yes" if row["enabled"] else "no",
                              "[green]yes[/]" if row["matched"] else "no", row["why"])
            out.print(table)
    if any("error" in r for r in results):
        raise typer.Exit(EXIT_FAILED)


def open_rules(path: Path) -> RulesFile:
    from ingest.rules_file import RulesFile

    try:
        return RulesFile.open(path)
    except IngestError as exc:
        err.print(f"[red]routing rules:[/] {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
