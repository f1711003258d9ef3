"""Completion outcomes per kind of sender, with the real parts: `lastmile up` (ingest
services) as a subprocess on a real nats-server, an engine worker running the LTS
reference pipeline, dcmtk's storescu and a scripted pynetdicom sender.

The same CT phantom study (same pixels, new UIDs per run) is sent five ways:

- ``single``: one storescu association (the reference result);
- ``split``: storescu once per image (one association each);
- ``paused``: storescu once per image, 2-3 s apart;
- ``aborted-resent``: pynetdicom aborts (A-ABORT) after half the images, then storescu
  re-sends the whole study;
- ``crash-resent``: pynetdicom sends half, `lastmile up` is killed with SIGKILL under
  it, stays down for longer than the quiet period, starts again, and storescu re-sends.

For each: completions, amendments, results, current results per study, and whether the
current result's measurements equal the single-association result's. The goal is one
current result per study, equal to the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from bench.e2e import _bench_pipeline
from engine.registry import deployed_event
from engine.spec import REFERENCE_DIR, load_pipeline
from events.base import Event
from events.catalogue import (
    InferenceCompleted,
    InferenceFailed,
    InferenceSkipped,
    ResultSuperseded,
    Stage,
    StudyAmended,
    StudyCompleted,
)
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port

SENDERS = ("single", "split", "paused", "aborted-resent", "crash-resent")
QUIET_S = 10.0  # the LTS reference default
RULES = (f"pipelines:\n  lts: {{completion: {{quiet_period_s: {QUIET_S:g}, "
         "max_wait_s: 300}}\n")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class SenderOutcome:
    sender: str
    instances: int
    completions: int
    amendments: int
    results: int
    superseded: int
    current_results: int
    skipped_or_failed: int  # runs skipped, or failed for good
    problems: list[str]  # why (skip reasons, final errors)
    reason: str | None
    partial: bool | None
    equal_to_single: bool | None
    last_instance_to_completed_s: float | None
    seconds: float


@dataclass
class CompletionBench:
    quiet_period_s: float
    outcomes: list[SenderOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _relabel(files: list[Path], out: Path, tag: str) -> list[Path]:
    """The same images under new Study/Series/SOP Instance UIDs (derived from ``tag``)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, keyword, generate_uid(entropy_srcs=[tag, str(ds.get(keyword))]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f.name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Up:
    """`lastmile up` with the ingest services, in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, port: int) -> None:
        self.env, self.log, self.port = env, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "lastmile", "up"], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lastmile up did not start: "
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


async def _storescu(port: int, files: list[Path]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "storescu", "-aet", "MODALITY", "-aec", "LM_LTS", "127.0.0.1", str(port),
        *map(str, files), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=DCMTK_ENV)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed: {out.decode(errors='replace')[-1000:]}")


def _pynetdicom_send(port: int, files: list[Path], *, abort: bool, hang_until: Any = None
                     ) -> int:
    """Send ``files`` in one association, then abort (or wait for ``hang_until()``)."""
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LM_LTS")
    if not assoc.is_established:
        raise RuntimeError("the SCP refused the association")
    ok = sum(int(getattr(assoc.send_c_store(pydicom.dcmread(f)), "Status", -1)) == 0
             for f in files)
    if abort:
        assoc.abort()
    else:
        deadline = time.monotonic() + 60
        while assoc.is_established and not hang_until() and time.monotonic() < deadline:
            time.sleep(0.05)
        if assoc.is_established:
            assoc.abort()
    return ok


async def _send(kind: str, port: int, files: list[Path], up: _Up) -> None:
    half = files[: len(files) // 2]
    if kind == "single":
        await _storescu(port, files)
    elif kind == "split":
        for f in files:
            await _storescu(port, [f])
    elif kind == "paused":
        rng = random.Random(7)
        for f in files:
            await _storescu(port, [f])
            await asyncio.sleep(rng.uniform(2.0, 3.0))
    elif kind == "aborted-resent":
        await asyncio.to_thread(_pynetdicom_send, port, half, abort=True)
        await asyncio.sleep(QUIET_S + 1)  # longer than the quiet period before the resend
        await _storescu(port, files)
    elif kind == "crash-resent":
        killed = asyncio.Event()
        before = _stored_count(up)
        sending = asyncio.create_task(asyncio.to_thread(
            _pynetdicom_send, port, half, abort=False, hang_until=killed.is_set))
        while True:  # all of the first half stored, then the service dies under it
            await asyncio.sleep(0.1)
            if sending.done() or _stored_count(up) >= before + len(half):
                break
        await asyncio.to_thread(up.kill)
        killed.set()
        with contextlib.suppress(Exception):
            await sending
        await asyncio.sleep(QUIET_S + 2)  # down for longer than the quiet period
        await asyncio.to_thread(up.start)
        await _storescu(port, files)
    else:
        raise ValueError(kind)


def _stored_count(up: _Up) -> int:
    instances = Path(up.env["LASTMILE_STATE_DIR"]) / "instances"
    return sum(1 for _ in instances.glob("*/*.dcm")) if instances.exists() else 0


def _measurements(ev: InferenceCompleted) -> dict[str, float]:
    return {m.name: round(m.value, 3) for m in ev.measurements}


async def _outcome(bus: EventBus, kind: str, study: str, n: int, t0: float,
                   reference: dict[str, float] | None) -> SenderOutcome:
    history: list[Event] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        history = [e for _, e in await bus.history(study)]
        done = [e for e in history if isinstance(e, InferenceCompleted)]
        pending = [e for e in history if isinstance(e, StudyAmended) and e.rerun]
        if done and len(done) > len(pending):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(QUIET_S + 1)  # nothing more may come: one quiet period more
    history = [e for _, e in await bus.history(study)]
    completions = [e for e in history if isinstance(e, StudyCompleted)]
    results = [e for e in history if isinstance(e, InferenceCompleted)]
    superseded = {e.run_key for e in history if isinstance(e, ResultSuperseded)}
    current = [r for r in results if r.run_key not in superseded]
    latency = None
    if completions and completions[0].last_instance_at:
        latency = completions[0].latency_s
    return SenderOutcome(
        sender=kind, instances=n, completions=len(completions),
        amendments=sum(isinstance(e, StudyAmended) for e in history),
        results=len(results), superseded=len(superseded), current_results=len(current),
        skipped_or_failed=sum(isinstance(e, InferenceSkipped)
                              or (isinstance(e, InferenceFailed) and e.final) for e in history),
        problems=sorted({e.reason if isinstance(e, InferenceSkipped) else e.error[:300]
                         for e in history if isinstance(e, InferenceSkipped)
                         or (isinstance(e, InferenceFailed) and e.final)}),
        reason=str(completions[0].reason) if completions else None,
        partial=completions[0].partial if completions else None,
        equal_to_single=(None if reference is None or len(current) != 1
                         else _measurements(current[0]) == reference),
        last_instance_to_completed_s=latency, seconds=round(time.perf_counter() - t0, 1))


async def run_completion_bench(senders: tuple[str, ...] = SENDERS) -> CompletionBench:
    from demo.phantoms import abdomen_ct_study
    from engine.worker import EngineWorker, WorkerConfig

    result = CompletionBench(QUIET_S, notes=[
        f"LTS completion defaults (quiet period {QUIET_S:g} s of up-time); one CT phantom "
        "study of 40 slices, the same pixels under new UIDs per sender",
        "completion runs in `lastmile up` (a subprocess, ingest services) on a real "
        "nats-server; the worker runs the LTS reference pipeline in this process",
    ])
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-completion-") as tmp_s:
        tmp = Path(tmp_s)
        state, port = tmp / "state", free_port()
        rules = tmp / "rules.yaml"
        rules.write_text(RULES)
        server = EmbeddedNats(tmp / "nats", port=free_port(), sync="2m").start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
        env.update(LASTMILE_STATE_DIR=str(state), LASTMILE_NATS_URL=server.url,
                   LASTMILE_DICOM_PORT=str(port), LASTMILE_SERVICES='["ingest"]',
                   LASTMILE_ROUTING_RULES=str(rules), LASTMILE_DICOM_MIN_FREE_MB="0",
                   TCP_NODELAY="1")
        up = _Up(env, tmp / "up.log", port)
        stop = asyncio.Event()
        bus = await EventBus.connect(BusSettings(servers=(server.url,)))
        worker_task: asyncio.Task[None] | None = None
        try:
            config = WorkerConfig(instances_dir=state / "instances",
                                  results_dir=tmp / "results",
                                  secret=b"bench-secret-0123456789abcdef01",
                                  worker_id="bench", heartbeat_s=5.0)
            lts = _bench_pipeline(load_pipeline(REFERENCE_DIR / "lts.yaml"), tmp, None)
            await bus.publish(deployed_event(lts, actor="bench", stage=Stage.VALIDATION))
            worker_task = asyncio.create_task(EngineWorker({"lts": lts}, config).run(bus, stop))
            study = abdomen_ct_study(9300)
            base = await asyncio.to_thread(study.write, tmp / "phantom")
            await asyncio.to_thread(up.start)
            reference: dict[str, float] | None = None
            for kind in senders:
                files = await asyncio.to_thread(_relabel, base, tmp / kind, kind)
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                t0 = time.perf_counter()
                await _send(kind, port, files, up)
                outcome = await _outcome(bus, kind, uid, len(files), t0, reference)
                if kind == "single" and outcome.current_results == 1:
                    history = [e for _, e in await bus.history(uid)]
                    reference = _measurements(next(
                        e for e in history if isinstance(e, InferenceCompleted)))
                    outcome.equal_to_single = True
                result.outcomes.append(outcome)
        finally:
            await asyncio.to_thread(up.kill, signal.SIGINT)
            stop.set()
            if worker_task is not None:
                await asyncio.gather(worker_task, return_exceptions=True)
            await bus.close()
            server.stop()
    return result
