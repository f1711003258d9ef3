"""The routing rules file on disk, reloaded when it changes.

An invalid edit is refused with its line and key (logged, and kept in ``last_error``)
and the rules in force stay as they were: a typo must never stop routing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ingest.errors import RulesError
from ingest.rules import RuleSet, default_rules, load_rules

log = logging.getLogger(__name__)


@dataclass
class RulesFile:
    """Holds the rules in force; ``poll()`` reloads them if the file changed."""

    path: Path | None
    _current: RuleSet = field(default_factory=default_rules, init=False)
    _stamp: tuple[int, int] | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    last_error: str | None = field(default=None, init=False)

    @classmethod
    def open(cls, path: Path | None) -> RulesFile:
        """Load the file now; an invalid file at start is an error (``RulesError``)."""
        rf = cls(path)
        if path is not None:
            rf._current = load_rules(path)
            rf._stamp = rf._stat()
        return rf

    def __call__(self) -> RuleSet:
        return self._current

    def _stat(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def poll(self) -> bool:
        """Reload if the file changed; True when new rules are in force."""
        if self.path is None:
            return False
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return False
        with self._lock:
            self._stamp = stamp
            try:
                rules = load_rules(self.path)
            except RulesError as exc:
                self.last_error = str(exc)
                log.error("routing rules NOT reloaded, the previous rules stay in force: %s", exc)
                return False
            if rules.sha256 == self._current.sha256:
                return False
            self._current, self.last_error = rules, None
        log.info("routing rules reloaded from %s (%d rules)", self.path, len(rules.rules))
        return True
