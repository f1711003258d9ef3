"""Engine test helpers: reference pipelines, a worker on the real bus, Orthanc, dciodvfy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.spec import REFERENCE_DIR, LoadedPipeline, load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.base import Event
from events.jetstream import EventBus
from events.nats_server import free_port
from tests.history import wait_for as _wait_for

SECRET = b"engine-test-secret-0123456789abcdef"


class _Reference(dict):  # type: ignore[type-arg]
    """The reference pipeline files, each loaded (and its model hash checked) on first use."""

    def __missing__(self, name: str) -> LoadedPipeline:
        loaded = load_pipeline(REFERENCE_DIR / f"{name}.yaml")
        self[name] = loaded
        return loaded


@pytest.fixture(scope="session")
def reference() -> dict[str, LoadedPipeline]:
    return _Reference()


@pytest.fixture
def worker_config(tmp_path: Path) -> WorkerConfig:
    return WorkerConfig(instances_dir=tmp_path / "instances", results_dir=tmp_path / "results",
                        secret=SECRET, worker_id="test-worker", max_attempts=2,
                        ack_wait_s=10.0, heartbeat_s=1.0)


async def wait_for(bus: EventBus, study_uid: str, done: Callable[[list[Event]], bool],
                   timeout_s: float = 60.0) -> list[Event]:
    return await _wait_for(bus, study_uid, done, timeout_s, poll_s=0.2)


def has(type_name: str, n: int = 1) -> Callable[[list[Event]], bool]:
    return lambda evs: sum(e.type_name() == type_name for e in evs) >= n


def model_pipeline(reference_yaml: Path, model: Path, tmp: Path, name: str,
                   runtime: str = "torch") -> Path:
    """A copy of a reference pipeline file under ``tmp`` that names another model file
    (its path and sha256; the model card line dropped), pipeline ``name`` and ``runtime``."""
    text = reference_yaml.read_text()
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    text = re.sub(r"(?m)^name: \w+", f"name: {name}", text)
    text = re.sub(r"(?m)^ae_title: \w+", f"ae_title: {name.upper()[:16]}", text)
    text = re.sub(r"(?m)^  path: .*", f"  path: {model}", text)
    text = re.sub(r"(?m)^  sha256: .*", f"  sha256: {sha}", text)
    text = re.sub(r"(?m)^  card: .*\n", "", text)
    text = re.sub(r"(?m)^runtime: .*", f"runtime: {runtime}", text)
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


class RunningWorker:
    def __init__(self, bus: EventBus, worker: EngineWorker) -> None:
        self.bus, self.worker, self.stop = bus, worker, asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EngineWorker:
        self.task = asyncio.create_task(self.worker.run(self.bus, self.stop))
        return self.worker

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 15)


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines dciodvfy reports as errors (warnings about our private 99LM codes allowed)."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


class Orthanc:
    """A real Orthanc (Debian package) on free ports, as the PACS receiving results."""

    def __init__(self, root: Path, modalities: dict[str, list[object]] | None = None) -> None:
        """``modalities``: Orthanc's DicomModalities (name -> [AE, host, port]), the
        destinations it sends to on a C-MOVE."""
        self.root = root
        self.modalities = modalities or {}
        self.dicom_port, self.http_port = free_port(), free_port()
        self.ae_title = "ORTHANC"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "lastmile-test", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "Plugins": [], "HttpServerEnabled": True,
            "ConcurrentJobs": 1, "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities,
        }
        conf = self.root / "orthanc.json"
        conf.write_text(json.dumps(config))
        log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115
        env = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK inside Orthanc: Nagle off
        self.proc = subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     env=env)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        tail = (self.root / "orthanc.log").read_text()[-800:]
        raise RuntimeError("Orthanc did not start: " + tail)

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop()
