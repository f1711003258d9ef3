"""Real DICOM peers for tests and the benchmark: dcmtk tools and an Orthanc PACS.

Each peer is a real Debian binary run as a child process on a free loopback port,
with ``TCP_NODELAY=1`` in its environment (DCMTK, and Orthanc through DCMTK, leave
Nagle's algorithm on otherwise and run at ~10 MB/s). Always used as context managers
so no process outlives its test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.errors import IngestError

ORTHANC_BINARY = "/usr/sbin/Orthanc"


class PeerError(IngestError):
    """A peer process could not be started or did not answer."""


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def have_dcmtk() -> bool:
    return shutil.which("storescu") is not None and shutil.which("storescp") is not None


def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    return ORTHANC_BINARY if Path(ORTHANC_BINARY).exists() else None


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"{what} exited at start (code {proc.returncode})")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise PeerError(f"{what} did not listen on port {port} within {timeout_s:.0f}s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class Storescp:
    """dcmtk ``storescp`` writing what it receives bit-preserving (``+B``) into ``out_dir``."""

    out_dir: Path
    port: int
    ae_title: str = "STORESCP"
    options: tuple[str, ...] = ()  # e.g. ("+xv",) to prefer JPEG 2000 lossless
    _proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Storescp:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "+B", *self.options, "-od", str(self.out_dir),
             str(self.port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        _wait_port(self.port, self._proc, 10, "storescp")
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self._proc)


@dataclass
class Orthanc:
    """Orthanc 1.x (SQLite index) on free ports; ``modalities`` maps id -> (AET, port)."""

    root: Path
    http_port: int
    dicom_port: int
    ae_title: str = "ORTHANC"
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "lastmile-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                name: {"AET": aet, "Host": "127.0.0.1", "Port": port}
                for name, (aet, port) in self.modalities.items()
            },
            "Plugins": [],
            "StableAge": 60,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "LogExportedResources": False,
        }

    def __enter__(self) -> Orthanc:
        binary = orthanc_binary()
        if binary is None:
            raise PeerError("Orthanc is not installed (Debian package orthanc)")
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in self.config().items() if v is not None}
        conf = self.root / "orthanc.json"
        conf.write_text(json.dumps(cfg, indent=1))
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
        self._proc = subprocess.Popen([binary, str(conf)], env=dcmtk_env(), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _wait_port(self.http_port, self._proc, 30, "Orthanc")
        _wait_port(self.dicom_port, self._proc, 30, "Orthanc DICOM")
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self._proc)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout_s: float = 120.0) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as rsp:  # noqa: S310 - loopback
                data = rsp.read()
        except urllib.error.HTTPError as exc:
            raise PeerError(f"Orthanc {method} {path}: HTTP {exc.code} "
                            f"{exc.read()[:300]!r}") from None
        return json.loads(data) if data else None

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /instances: put a DICOM file into the PACS."""
        result: dict[str, Any] = self.request("POST", "/instances", path.read_bytes(),
                                              "application/dicom")
        return result

    def push(self, modality: str, resources: list[str]) -> Any:
        """POST /modalities/{id}/store: the PACS sends resources to a DICOM node (C-STORE)."""
        body = json.dumps({"Resources": resources, "Synchronous": True}).encode()
        return self.request("POST", f"/modalities/{modality}/store", body)

    def count_instances(self) -> int:
        return len(self.request("GET", "/instances"))
