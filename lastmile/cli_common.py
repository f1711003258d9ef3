"""What every command module shares: the two consoles, the exit codes (README: Exit codes)
and the site's settings that ``lastmile``'s callback loaded with the global options.

Start-up (issue 17): ``lastmile --help`` and ``lastmile GROUP --help`` import no heavy
package (PyTorch, MONAI, ONNX Runtime, pydicom, highdicom, pynetdicom, DuckDB, NATS,
Streamlit, NumPy; tests/cli/test_startup.py). A command module imports them inside the
command that needs them, or names a function with :func:`lazy` where its import lines must
stay as they are.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from lastmile.settings import Settings

EXIT_FAILED = 1
EXIT_CONFIG = 3
EXIT_BUS = 4
EXIT_NOT_FOUND = 5

out = Console()
err = Console(stderr=True)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings of this invocation (loaded once by the root callback)."""
    from lastmile.settings import Settings

    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):
        raise typer.BadParameter("settings not loaded")
    return obj


def lazy(module: str, name: str) -> Callable[..., Any]:
    """The function ``module.name``, imported at its first call rather than with the command
    module (pair it with the real import under ``TYPE_CHECKING`` so its type is checked).
    Only for functions: a class or an exception that ``isinstance``/``except`` names is
    imported inside the command instead. Raises ``ImportError``/``AttributeError`` at the
    first call if ``module.name`` does not exist."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call
