"""Real processes for the drills: `lastmile up` on a given NATS, dcmtk storescu, and
engine workers as subprocesses (so that ``kill -9`` hits a real process).

Every process is started in its own process group and bounded by timeouts; the
context managers kill what they started, and only that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LASTMILE = [sys.executable, "-m", "lastmile"]
HERE = Path(__file__).parent
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any LASTMILE_* of the caller, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    env.update({f"LASTMILE_{k.upper()}": v for k, v in settings.items()})
    env["TCP_NODELAY"] = "1"
    return env


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGINT (a clean stop), then SIGKILL of the process group we created."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def lastmile_up(env: dict[str, str], log: Path, *, wait_port: int | None,
                timeout_s: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """`lastmile up` as an operator runs it (output to ``log``); ready when it says so
    and, if given, when ``wait_port`` (the DICOM receiver) accepts connections."""
    out = open(log, "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([*LASTMILE, "up"], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out.close()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            text = log.read_text(errors="replace")
            if "Lastmile is up" in text and (wait_port is None or listening(wait_port)):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lastmile up did not come up:\n{text[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        _stop_group(proc)


@contextlib.contextmanager
def engine_worker(nats_url: str, stream: str, pipeline: Path, state: Path, worker_id: str,
                  log: Path, *, ack_wait_s: float = 3.0) -> Iterator[subprocess.Popen[bytes]]:
    """The engine worker (``EngineWorker.run``) in a process of its own: ``worker_proc.py``."""
    out = open(log, "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "worker_proc.py"), nats_url, stream, str(pipeline),
         str(state), worker_id, str(ack_wait_s)],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    try:
        deadline = time.monotonic() + 60
        while "worker ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker_id} did not start:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        _stop_group(proc, grace_s=10.0)


@dataclass(frozen=True)
class Sent:
    """What one storescu run did: exit code, files answered Success, elapsed time."""

    returncode: int
    succeeded: frozenset[str]
    failed: frozenset[str]
    elapsed_s: float
    output: str


_SENDING = re.compile(r"Sending file: (\S+)")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")


def parse_storescu(output: str) -> tuple[set[str], set[str]]:
    """Which files storescu (``-v``) saw answered Success, and which not."""
    ok: set[str] = set()
    bad: set[str] = set()
    current: str | None = None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = m.group(1)
        elif (m := _RESPONSE.search(line)) and current is not None:
            (ok if m.group(1) == "Success" else bad).add(current)
            current = None
    return ok, bad


async def storescu(port: int, called: str, files: Sequence[Path], *,
                   calling: str = "DRILL_SCU", timeout_s: float = 120.0) -> Sent:
    """dcmtk storescu, verbose, as a modality would send (halts at the first failure,
    its default)."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "storescu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
        *map(str, files), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=DCMTK_ENV)
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = raw.decode(errors="replace")
    ok, bad = parse_storescu(text)
    return Sent(int(proc.returncode or 0), frozenset(ok), frozenset(bad),
                time.perf_counter() - t0, text)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty sample."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
