"""The routing rules file on disk, reloaded when it changes, with the deployed pipelines.

An invalid edit is refused with its line and key (logged, and kept in ``last_error``)
and the rules in force stay as they were: a typo must never stop routing. The rules in
force are the file's plus the pipelines the log has deployed (``set_deployed``, fed by
``ingest.deployments``; ``ingest.rules.with_deployed`` merges them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from events.deployments import DeployedPipeline
from ingest.errors import RulesError
from ingest.rules import RuleSet, default_rules, load_rules, with_deployed

log = logging.getLogger(__name__)


@dataclass
class RulesFile:
    """Holds the rules in force; ``poll()`` reloads them if the file changed."""

    path: Path | None
    _current: RuleSet = field(default_factory=default_rules, init=False)
    _stamp: tuple[int, int] | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    last_error: str | None = field(default=None, init=False)
    _deployed: Mapping[str, DeployedPipeline] = field(default_factory=dict, init=False)
    _merged: RuleSet | None = field(default=None, init=False)
    _deployed_known: bool = field(default=False, init=False)  # set_deployed was called
    #: called (from any thread) before a called AE title is answered: brings in a
    #: deployment or retirement recorded a moment ago (set by ``ingest.deployments``)
    refresh: Callable[[], None] | None = field(default=None, init=False)

    @classmethod
    def open(cls, path: Path | None) -> RulesFile:
        """Load the file now; an invalid file at start is an error (``RulesError``)."""
        rf = cls(path)
        if path is not None:
            rf._current = load_rules(path)
            rf._stamp = rf._stat()
        return rf

    def __call__(self) -> RuleSet:
        merged = self._merged
        if merged is None:
            merged, conflicts = with_deployed(self._current, self._deployed)
            for line in conflicts:
                log.error("routing: %s", line)
            unknown = [p for p in merged.undeclared() if p not in self._deployed]
            if unknown and self._deployed_known:
                log.warning("routing rules name pipelines that are neither listed under "
                            "`pipelines:` nor deployed: %s (their studies will be "
                            "recorded as not run)", ", ".join(unknown))
            self._merged = merged
        return merged

    def set_deployed(self, deployed: Mapping[str, DeployedPipeline]) -> bool:
        """The log's deployed pipelines changed; True when that changes the rules."""
        if self._deployed_known and dict(deployed) == dict(self._deployed):
            return False
        with self._lock:
            self._deployed, self._deployed_known = dict(deployed), True
            self._merged = None
        log.info("deployed pipelines now: %s", ", ".join(
            f"{n} ({d.ae_title or 'no AE title'})" for n, d in sorted(deployed.items())
            if not d.retired) or "none")
        return True

    def recognise(self, called_ae: str) -> bool:
        """Whether ``called_ae`` is a pipeline's AE title *now*: the log is looked at once
        more (``refresh``, one STREAM.INFO request) before every answer, so a deployment or
        a retirement recorded a moment ago decides the very next association. When the log
        cannot be reached the rules last seen decide (the store would fail anyway)."""
        if self.refresh is not None:
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the log is an edge: decide, log why
                log.warning("could not re-read deployments before answering for an AE "
                            "title: %s", type(exc).__name__)
        return called_ae in self().ae_titles()

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
            self._current, self.last_error, self._merged = rules, None, None
        log.info("routing rules reloaded from %s (%d rules)", self.path, len(rules.rules))
        return True
