"""What every command module shares: the two consoles, the exit codes (README: Exit codes)
and the site's settings that ``lastmile``'s callback loaded with the global options."""

from __future__ import annotations

import typer
from rich.console import Console

from lastmile.settings import Settings

EXIT_FAILED = 1
EXIT_CONFIG = 3
EXIT_BUS = 4
EXIT_NOT_FOUND = 5

out = Console()
err = Console(stderr=True)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings of this invocation (loaded once by the root callback)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):
        raise typer.BadParameter("settings not loaded")
    return obj
