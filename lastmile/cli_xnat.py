"""`lastmile xnat check`: the XNAT connection the publisher will use."""

from __future__ import annotations

from typing import Annotated

import typer

from events.errors import ConfigError
from lastmile.cli_common import err, out

xnat_app = typer.Typer(help="XNAT: check the connection the publisher will use.",
                       no_args_is_help=True)


@xnat_app.command("check")
def xnat_check(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Log in to the configured XNAT and report its version and the project's state."""
    import json

    from engine.xnat_publisher import XnatConnection, XnatPublishError
    from lastmile.services_xnat import XnatSettings

    try:
        xnat = XnatSettings.from_env()
    except ConfigError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if not xnat.enabled:
        err.print("LASTMILE_XNAT_URL is not set: results go to Lastmile's own review pages")
        raise typer.Exit(1)
    connection = XnatConnection(xnat.access())

    def probe(session: object) -> dict[str, object]:
        projects = session.projects  # type: ignore[attr-defined]
        return {"url": xnat.url, "version": session.xnat_version,  # type: ignore[attr-defined]
                "user": session.logged_in_user,  # type: ignore[attr-defined]
                "project": xnat.project, "project_exists": xnat.project in projects}

    try:
        info = connection.call(probe)
    except XnatPublishError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(3) from None
    finally:
        connection.close()
    if as_json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            out.print(f"{k}: {v}")
