"""One writer per store: an advisory lock file that names the process holding it.

A JetStream file store or a DuckDB read model written by two processes at once is
corrupted or silently diverges; a second `lastmile up` on the same state directory
must be refused with a message that names the first. ``StoreLock`` takes a POSIX
``flock`` (exclusive, non-blocking) on ``<what>.lock`` and writes the holder's pid,
command line and start time into it. The kernel drops the lock when the process (and
any child it handed the descriptor to, see ``fileno``) exits, even after ``kill -9``,
so a stale lock file never blocks a restart. Readers (audit, replay, metrics) take no
lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from events.errors import EventsError


class StoreLocked(EventsError):
    """Another process writes this store; the message names it (pid, command)."""


class StoreLock:
    """An exclusive lock on ``path`` (the lock file itself), for the store ``what``."""

    def __init__(self, path: Path, what: str, detail: str = "") -> None:
        self.path = path
        self.what = what
        self.detail = detail
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        """Take the lock, or raise ``StoreLocked`` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreLocked(
                f"{self.what} is in use by {holder} (lock {self.path}): only one process may "
                "write it. Stop that process first; read-only commands (audit, replay, "
                "metrics) and extra receivers or workers pointed at its NATS still run"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(), "command": _command_line(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "detail": self.detail}).encode(), 0)
        self._fd = fd
        return self

    def fileno(self) -> int:
        """The locked descriptor: pass it to a child (``pass_fds``) so the lock lasts as
        long as the child does."""
        if self._fd is None:
            raise ValueError("not locked")
        return self._fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops our share of the lock (a child may still hold it)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _command_line() -> str:
    """This process's command line as `ps` shows it (``python -m lastmile up``)."""
    try:
        raw = Path("/proc/self/cmdline").read_bytes()
        return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    except OSError:
        return " ".join(sys.argv) or sys.executable


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        text = f"pid {data['pid']} ({data['command']}, since {data['since']})"
        return text + (f", {data['detail']}" if data.get("detail") else "")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
