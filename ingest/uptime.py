"""The completion service's own up-time: quiet periods and maximum waits are measured in
it, so time the service was down never counts as quiet.

``Uptime`` maps a wall-clock instant to seconds of up-time: the sum of the intervals the
service ran, up to that instant (an instant inside a down interval maps to the end of the
run before it). The intervals are persisted (``UptimeFile``, a small JSON file written
atomically about once a second), so a ``kill -9`` loses at most that second, and a study
half received before a crash is not completed at once after the restart.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

#: keep the file small: intervals older than this many restarts are merged into one
#: offset (their up-time still counts)
MAX_INTERVALS = 256


class Clock(Protocol):
    def at(self, t: datetime) -> float:
        """Seconds on this clock at wall-clock instant ``t``."""


class WallClock:
    """Up-time equals wall time (tests, and a tracker used once by ``study complete``)."""

    def at(self, t: datetime) -> float:
        return t.timestamp()


class Uptime:
    """Wall time -> up-time, from the intervals (epoch seconds) the service ran."""

    def __init__(self, intervals: list[list[float]] | None = None, offset: float = 0.0) -> None:
        self.intervals: list[list[float]] = [list(i) for i in intervals or []]
        self.offset = offset  # up-time of intervals merged away, all before the first kept
        self._floor = self.intervals[0][0] if self.intervals else 0.0

    def start(self, now: datetime) -> None:
        """A new run begins at ``now``."""
        t = now.timestamp()
        if self.intervals and t < self.intervals[-1][1]:
            t = self.intervals[-1][1]  # the wall clock went back: never count time twice
        self.intervals.append([t, t])
        while len(self.intervals) > MAX_INTERVALS:
            a, b = self.intervals.pop(0)
            self.offset += b - a
            self._floor = self.intervals[0][0]

    def advance(self, now: datetime) -> None:
        """The service is still running at ``now``."""
        if not self.intervals:
            self.start(now)
        last = self.intervals[-1]
        last[1] = max(last[1], now.timestamp())

    def at(self, t: datetime) -> float:
        ts = t.timestamp()
        total = self.offset if ts >= self._floor else 0.0
        for a, b in self.intervals:
            if ts <= a:
                break
            total += min(ts, b) - a
        return total

    def total(self) -> float:
        return self.offset + sum(b - a for a, b in self.intervals)


class UptimeFile:
    """``Uptime`` persisted as JSON at ``path`` (written atomically)."""

    def __init__(self, path: Path, every_s: float = 1.0) -> None:
        self.path = path
        self.every_s = every_s
        self._saved_at = 0.0
        self.clock = self._load()

    def _load(self) -> Uptime:
        try:
            raw = json.loads(self.path.read_text())
            return Uptime([[float(a), float(b)] for a, b in raw["intervals"]],
                          float(raw.get("offset", 0.0)))
        except FileNotFoundError:
            return Uptime()
        except (ValueError, KeyError, TypeError) as exc:
            # losing the history only makes quiet periods start again: never a false
            # completion
            log.warning("%s is unreadable (%s): up-time starts again from now", self.path, exc)
            return Uptime()

    def start(self, now: datetime) -> None:
        self.clock.start(now)
        self.save(now, force=True)

    def advance(self, now: datetime) -> None:
        self.clock.advance(now)
        self.save(now)

    def save(self, now: datetime, force: bool = False) -> None:
        t = now.timestamp()
        if not force and t - self._saved_at < self.every_s:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"offset": self.clock.offset,
                                   "intervals": self.clock.intervals}))
        os.replace(tmp, self.path)
        self._saved_at = t
