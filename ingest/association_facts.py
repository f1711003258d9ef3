"""Association facts as events: what each DICOM association carried and how it ended.

The SCP calls ``AssociationFacts`` from pynetdicom's threads: ``opened`` when an
association is accepted, ``carried`` for each instance answered with Success (stored or a
duplicate), ``ending`` when an abort primitive arrives (who aborted), and ``ended`` once
(released, aborted, or the connection closed). ``ended`` publishes, and waits for the
acks of, ``ingest.association.released`` or ``ingest.association.aborted`` once per study
the association carried, with the count and a SHA-256 of the SOP Instance UIDs it
carried of that study (PS3.8 A-RELEASE, A-ABORT, A-P-ABORT). The completion service
reads them from the log, whichever receiver process wrote them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from events.base import Event, deterministic_id
from events.catalogue import AssociationAborted, AssociationOpened, AssociationReleased
from events.errors import EventsError
from ingest.receiver import Publish

log = logging.getLogger(__name__)


def sop_digest(sop_instance_uids: set[str]) -> str:
    """SHA-256 of the sorted SOP Instance UIDs, one per line (compare, never list)."""
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()


@dataclass
class _Open:
    calling_ae: str = ""
    called_ae: str = ""
    started: float = field(default_factory=time.monotonic)
    studies: dict[str, set[str]] = field(default_factory=dict)
    aborted_by: str | None = None  # from the abort primitive, before the end


@dataclass
class AssociationFacts:
    """Thread-safe per-association bookkeeping that ends in events."""

    publish: Publish
    receiver: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _open: dict[str, _Open] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def _record(self, events: list[Event]) -> None:
        try:
            self.publish(events)
        except EventsError as exc:  # the instances are recorded; only evidence is lost
            log.error("could not record association facts: %s", exc)

    def opened(self, association_id: str, *, calling_ae: str, called_ae: str,
               source_address: str | None, refused_contexts: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._open[association_id] = _Open(calling_ae, called_ae)
        self._record([AssociationOpened.new(
            actor=f"scp:{called_ae}", event_id=deterministic_id("assoc-opened", association_id),
            association_id=association_id, calling_ae=calling_ae, called_ae=called_ae,
            source_address=source_address, receiver=self.receiver,
            refused_contexts=refused_contexts)])

    def carried(self, association_id: str, study_uid: str, sop_instance_uid: str) -> None:
        with self._lock:
            a = self._open.get(association_id)
            if a is not None:
                a.studies.setdefault(study_uid, set()).add(sop_instance_uid)

    def ending(self, association_id: str, aborted_by: str) -> None:
        with self._lock:
            a = self._open.get(association_id)
            if a is not None and a.aborted_by is None:
                a.aborted_by = aborted_by

    def ended(self, association_id: str, aborted_by: str | None, *,
              aborted: bool = False) -> None:
        """Released (``aborted`` False) or aborted by ``aborted_by`` (else by what the
        abort primitive said, else the peer); only the first call per association counts."""
        with self._lock:
            a = self._open.pop(association_id, None)
        if a is None:
            return
        by = (a.aborted_by or aborted_by or "requestor") if aborted else None
        duration = round(time.monotonic() - a.started, 3)
        total = sum(len(s) for s in a.studies.values())
        actor = f"scp:{a.called_ae}"
        events: list[Event] = []
        carried: list[tuple[str | None, set[str]]] = [*sorted(a.studies.items())]
        for study, sops in carried or [(None, set())]:
            common = dict(
                actor=actor, study_uid=study, association_id=association_id,
                calling_ae=a.calling_ae, called_ae=a.called_ae, instance_count=len(sops),
                sop_instances_sha256=sop_digest(sops) if sops else None,
                association_instance_count=total, duration_s=duration)
            if by is None:
                events.append(AssociationReleased.new(
                    event_id=deterministic_id("assoc-released", association_id, study),
                    **common))  # type: ignore[arg-type]
            else:
                events.append(AssociationAborted.new(
                    event_id=deterministic_id("assoc-aborted", association_id, study),
                    aborted_by=by, **common))  # type: ignore[arg-type]
        self._record(events)
