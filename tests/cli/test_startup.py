"""Start-up of the command line (issue 17): `lastmile --help` and `lastmile GROUP --help`
import none of the heavy packages (fresh interpreters under ``-X importtime``), and the
lazily loaded root lists and shows every command exactly as the eagerly built one."""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from bench.cli import HEAVY_PACKAGES, import_check
from lastmile.cli import ADDED, LAZY, app

ROOT_ENTRIES = list(typer.main.get_group(app).commands)  # up, audit, replay, then LAZY


@pytest.mark.parametrize("args", [[], *([name] for name in ROOT_ENTRIES)],
                         ids=lambda a: " ".join(a) or "lastmile")
def test_help_imports_no_heavy_package(args: list[str], tmp_path: Path) -> None:
    check = import_check([*args, "--help"], cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    assert "Usage: python -m lastmile" in check.stdout
    assert check.modules > 100  # the import log was read (typer and rich alone are more)
    assert check.heavy == [], f"lastmile {' '.join(args)} --help imported {check.heavy}"


def test_the_check_sees_a_heavy_import(tmp_path: Path) -> None:
    """The check above is not blind: a command that runs (not only shows help), reading a
    file with pydicom and the routing settings (NATS), is caught."""
    (tmp_path / "r.dcm").write_bytes(b"not dicom")
    check = import_check(["route", "test", str(tmp_path / "r.dcm")], cwd=tmp_path)
    assert {"pydicom", "nats"} <= set(check.heavy) <= set(HEAVY_PACKAGES)


def eager_app() -> typer.Typer:
    """`lastmile` built as before issue 17: every command module imported and each of its
    commands and groups added to the root app, `from-bundle` to `pipelines`."""
    ref = copy.copy(app)
    ref.info = copy.copy(app.info)
    ref.info.cls = None  # a plain TyperGroup
    ref.registered_commands = list(app.registered_commands)
    ref.registered_groups = list(app.registered_groups)
    for name, (_, module, attribute) in LAZY.items():
        target = getattr(importlib.import_module(module), attribute)
        if isinstance(target, typer.Typer):
            if name in ADDED:  # a copy: the module's own app stays as it is
                target = copy.copy(target)
                target.registered_commands = list(target.registered_commands)
                for sub, sub_module, function in ADDED[name]:
                    target.command(sub)(getattr(importlib.import_module(sub_module), function))
            ref.add_typer(target, name=name)
        else:
            ref.command(name)(target)
    return ref


def command_paths(command: object, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, sub in getattr(command, "commands", {}).items():
        yield (*prefix, name)
        yield from command_paths(sub, (*prefix, name))


def test_every_help_is_the_eager_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root's list comes from a table (LAZY), each command from its module when asked:
    both must show what the eagerly built command line showed, word for word."""
    monkeypatch.chdir(tmp_path)  # no lastmile.toml
    for key in [k for k in os.environ if k.startswith("LASTMILE_")]:
        monkeypatch.delenv(key)
    ref = eager_app()
    paths = [(), *command_paths(typer.main.get_command(ref))]
    assert {p[0] for p in paths if p} == set(ROOT_ENTRIES)  # the table lists every command
    assert ("pipelines", "from-bundle") in paths
    runner = CliRunner()
    for path in paths:
        args = [*path, "--help"]
        lazy = runner.invoke(app, args, env={"COLUMNS": "100"})
        eager = runner.invoke(ref, args, env={"COLUMNS": "100"})
        assert lazy.exit_code == eager.exit_code == 0, (path, lazy.output)
        assert lazy.output == eager.output, path
        assert "Usage: lastmile" in lazy.output


def test_an_unknown_command_still_suggests_a_lazy_one() -> None:
    result = CliRunner().invoke(app, ["pipelins"], env={"COLUMNS": "100"})
    assert result.exit_code == 2
    assert "Did you mean 'pipelines'?" in result.output


def test_bench_cli_times_the_commands_against_the_interpreter(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lastmile", "bench", "cli", "--runs", "2",
                             "--json"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["peer"] == "python -c pass"
    assert set(report["p50_s"]) == {"python -c pass (peer)", "python -c 'import typer.rich_utils'",
                                    "lastmile --help", "lastmile pipelines --help"}
    for name, p50 in report["p50_s"].items():
        assert 0 < p50 <= report["p90_s"][name]
        assert len(report["times_s"][name]) == 2
    assert report["heavy"] == {"lastmile --help": [], "lastmile pipelines --help": []}
