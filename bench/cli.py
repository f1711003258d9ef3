"""``lastmile bench cli``: how long the command line takes to start (issue 17: its
start-up must not import PyTorch, MONAI and the rest; ``lastmile --help`` about 1 s).

Times N runs of ``lastmile --help`` and ``lastmile pipelines --help``, each in a fresh
process, interleaved with the peer, ``python -c pass`` (the interpreter's own start, the
floor no command line goes below), and with ``python -c "import typer.rich_utils"`` (what
any Typer command line with Rich help pays). Also runs each command once under
``python -X importtime`` and names the heavy packages it imported (none is the goal).
tests/cli/test_startup.py uses the same check.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: top-level packages that ``lastmile --help`` and ``lastmile GROUP --help`` must not
#: import: the models' runtimes, DICOM, the log's client, the read model, the pages
HEAVY_PACKAGES = ("torch", "monai", "onnxruntime", "onnx", "pydicom", "highdicom",
                  "pynetdicom", "duckdb", "pyarrow", "nats", "streamlit", "numpy", "pandas",
                  "SimpleITK", "nibabel", "xnat")

TARGET_S = 1.0  # issue 17: `lastmile --help` stays ~1 s


def lastmile_argv() -> list[str]:
    """The installed ``lastmile`` console script beside this interpreter, else
    ``python -m lastmile`` (the same entry point, ``lastmile.cli:main``)."""
    script = Path(sys.executable).with_name("lastmile")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lastmile"]


def quiet_env() -> dict[str, str]:
    """This environment without ``LASTMILE_*`` settings, 100 columns of help."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    env["COLUMNS"] = "100"
    return env


@dataclass
class ImportCheck:
    """One run of ``python -X importtime -m lastmile ARGS``: exit status, output, and the
    heavy packages (:data:`HEAVY_PACKAGES`) it imported."""

    args: list[str]
    returncode: int
    stdout: str
    heavy: list[str]
    modules: int  # modules imported in all


def import_check(args: Sequence[str], cwd: Path, timeout_s: float = 120) -> ImportCheck:
    """Run ``lastmile ARGS`` in a fresh interpreter under ``-X importtime`` in ``cwd``
    (no ``LASTMILE_*`` variables) and report what it imported. Raises
    ``subprocess.TimeoutExpired`` after ``timeout_s``."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lastmile", *args],
                          capture_output=True, text=True, cwd=cwd, env=quiet_env(),
                          timeout=timeout_s)
    names = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2]
    top = {name.split(".")[0] for name in names}
    return ImportCheck(list(args), proc.returncode, proc.stdout,
                       sorted(top & set(HEAVY_PACKAGES)), len(names))


@dataclass
class CliBench:
    runs: int
    p50_s: dict[str, float]
    p90_s: dict[str, float]
    heavy: dict[str, list[str]]
    load_average: tuple[float, float]
    python: str
    target: str = f"lastmile --help <= {TARGET_S:g} s (p50)"
    verdict: str = ""
    peer: str = "python -c pass"
    times_s: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (inclusive method) of at least two values."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_cli_bench(runs: int = 20) -> CliBench:
    """Time ``runs`` fresh processes of each command, interleaved (one warm-up each,
    untimed), in an empty folder; ``runs`` >= 2. Raises ``subprocess.CalledProcessError``
    if a command fails."""
    lastmile = lastmile_argv()
    commands = {
        "python -c pass (peer)": [sys.executable, "-c", "pass"],
        "python -c 'import typer.rich_utils'": [sys.executable, "-c", "import typer.rich_utils"],
        "lastmile --help": [*lastmile, "--help"],
        "lastmile pipelines --help": [*lastmile, "pipelines", "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-cli-") as tmp:
        cwd, env = Path(tmp), quiet_env()
        for i in range(runs + 1):
            for name, argv in commands.items():
                start = time.perf_counter()
                subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
                if i:  # the first round warms the file cache
                    times[name].append(time.perf_counter() - start)
        heavy = {f"lastmile {' '.join(args)}": import_check(args, cwd).heavy
                 for args in (["--help"], ["pipelines", "--help"])}
    p50 = {name: round(_quantile(t, 50), 3) for name, t in times.items()}
    p90 = {name: round(_quantile(t, 90), 3) for name, t in times.items()}
    met = p50["lastmile --help"] <= TARGET_S and not any(heavy.values())
    return CliBench(runs=runs, p50_s=p50, p90_s=p90, heavy=heavy,
                    load_average=(load_start, os.getloadavg()[0]),
                    python=sys.version.split()[0], verdict="met" if met else "missed",
                    times_s={k: [round(x, 3) for x in v] for k, v in times.items()})
