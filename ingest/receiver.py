"""What one C-STORE becomes: a durable file and an acknowledged event, or a named refusal.

``InstanceReceiver.receive`` is the store-and-publish path, free of pynetdicom so it can
be driven directly (the hypothesis test feeds it mutated bytes). It is called from the
SCP's association threads; ``publish`` blocks until JetStream acknowledged the events.

Order of work, and why: refuse cheaply first (size, disk space, element structure,
Affected SOP Instance UID); then, under a per-SOP-Instance lock, decode the header and
check its UIDs and SOP Class against the request (a refusal writes nothing), hash, and
write the file under its final name; identical bytes already in the log are a
duplicate, anything else a new version. Then publish (routing decision, then ``instance
stored``) while this thread fsyncs the file, and only when both are done answer Success. If
the publish fails, a file this call created is removed and the sender gets a failure
status, so it retries and nothing is half-recorded.

All of it runs on the association's own thread; only the publish goes to the event
loop. Handing the hash and write to a worker so they overlap with the header decode
looks faster but is not: the worker needs the GIL to start while the decode holds it,
so it began only after the decode anyway, and each hand-off between threads cost about
half a millisecond per instance (``lastmile bench ingest``). What overlaps is the file's
fsync with the log's, and neither holds the GIL.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from events.base import Event, deterministic_id
from events.catalogue import (
    InstanceDuplicated,
    InstanceRejected,
    InstanceStored,
    RouteMatched,
    RouteUnmatched,
)
from events.errors import EventsError, OutOfSpace, StoreError
from events.instance_store import InstanceStore, StoredFile
from ingest.dataset import (
    DEFLATED,
    Buffer,
    InstanceFacts,
    check_structure,
    facts,
    file_meta,
    parse,
    silence_value_warnings,
    tag_values,
    undeclared_text,
    without_text,
)
from ingest.errors import BadInstance
from ingest.evidence import instance_evidence
from ingest.rules import RuleSet, route
from ingest.spool import SpooledDataset, inflate_to_disk
from ingest.statuses import StoreStatus

log = logging.getLogger(__name__)


class _BadWithFacts(BadInstance):
    """A refusal after the header was decoded: the event can name the study."""

    def __init__(self, status: int, reason: str, facts: InstanceFacts, *,
                 code: str | None = None, first: tuple[str, str] | None = None) -> None:
        super().__init__(status, reason)
        self.facts = facts
        self.code = code
        self.first = first


class _RecordFailed(Exception):
    """The event log did not acknowledge (kept apart from refusals of the instance)."""

    def __init__(self, error: EventsError, facts: InstanceFacts) -> None:
        super().__init__(str(error))
        self.error = error
        self.facts = facts

class Publish(Protocol):
    """How the receiver records events (``ingest.jetstream.ThreadPublisher``)."""

    def __call__(self, events: Sequence[Event]) -> None:
        """Publish in order and wait for the acks; raise ``EventsError`` without them."""

    def start(self, events: Sequence[Event]) -> Callable[[], None]:
        """Begin publishing; the returned call waits for the acks (raising the same)."""


@dataclass(frozen=True)
class Received:
    """One C-STORE request as the association delivered it."""

    dataset: bytes | SpooledDataset  # encoded as received, without file meta
    transfer_syntax_uid: str
    sop_class_uid: str  # the request's Affected SOP Class (= the presentation context's)
    sop_instance_uid: str | None  # the request's Affected SOP Instance
    calling_ae: str
    called_ae: str
    source_address: str | None = None
    association_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    status: StoreStatus
    reason: str
    study_uid: str | None = None
    events: tuple[Event, ...] = ()
    stored: StoredFile | None = None


class InstanceIndex:
    """SOP Instance UID -> {sha256: version}, and the (study, series) that first held
    it: what the log says is stored.

    Rebuilt from ``ingest.instance.stored`` events at start, so duplicates and versions
    survive a restart. Guarded by striped locks so associations run in parallel but the
    same SOP Instance is decided one at a time.
    """

    STRIPES = 64

    def __init__(self) -> None:
        self._versions: dict[str, dict[str, int]] = {}
        self._homes: dict[str, tuple[str, str]] = {}
        self._locks = [threading.Lock() for _ in range(self.STRIPES)]

    def lock(self, sop_instance_uid: str) -> threading.Lock:
        return self._locks[hash(sop_instance_uid) % self.STRIPES]

    def observe(self, event: InstanceStored) -> None:
        self._versions.setdefault(event.sop_instance_uid, {})[event.sha256] = event.version
        if event.study_uid:
            self._homes.setdefault(event.sop_instance_uid, (event.study_uid, event.series_uid))

    def home(self, sop_instance_uid: str) -> tuple[str, str] | None:
        """(study, series) of the first stored object with this SOP Instance UID."""
        return self._homes.get(sop_instance_uid)

    def version_of(self, sop_instance_uid: str, sha256: str) -> int | None:
        return self._versions.get(sop_instance_uid, {}).get(sha256)

    def next_version(self, sop_instance_uid: str) -> int:
        known = self._versions.get(sop_instance_uid, {})
        return max(known.values(), default=0) + 1

    def __len__(self) -> int:
        return len(self._versions)


@dataclass
class ReceiverConfig:
    general_ae: str = "LASTMILE"
    max_instance_bytes: int = 2048 * 2**20
    route_cache_size: int = 4096
    actor_prefix: str = "scp"


@dataclass
class InstanceReceiver:
    store: InstanceStore
    publish: Publish
    secret: bytes
    rules: Callable[[], RuleSet]
    config: ReceiverConfig = field(default_factory=ReceiverConfig)
    index: InstanceIndex = field(default_factory=InstanceIndex)

    def __post_init__(self) -> None:
        silence_value_warnings()
        self._routes: OrderedDict[tuple[str, str, str, str], tuple[str, ...]] = OrderedDict()
        self._routes_lock = threading.Lock()

    # ------------------------------------------------------------------ entry

    def receive(self, r: Received) -> Outcome:
        """Never raises: every problem becomes a named status (and an event when possible)."""
        try:
            return self._receive(r)
        finally:
            if isinstance(r.dataset, SpooledDataset):
                r.dataset.close()

    def _receive(self, r: Received) -> Outcome:
        inflated: list[SpooledDataset] = []
        try:
            plain = self._precheck(r, inflated)
            assert r.sop_instance_uid is not None
            with self.index.lock(r.sop_instance_uid):
                return self._store_and_publish(r, plain)
        except _BadWithFacts as exc:
            return self._reject(r, StoreStatus(exc.status), exc.reason, exc.facts,
                                code=exc.code, first=exc.first)
        except BadInstance as exc:
            return self._reject(r, StoreStatus(exc.status), exc.reason, None,
                                code=exc.code)
        except OutOfSpace as exc:
            return self._reject(r, StoreStatus.REFUSED_OUT_OF_RESOURCES, str(exc), None)
        except StoreError as exc:
            log.error("store failed: %s", exc)
            return self._reject(r, StoreStatus.PROCESSING_FAILURE, str(exc), None)
        except _RecordFailed as exc:
            log.error("event log failed: %s", exc.error)
            return self._reject(r, StoreStatus.PROCESSING_FAILURE,
                                f"the event log did not acknowledge: {exc.error}", exc.facts)
        finally:
            for spool in inflated:
                spool.close()

    def _precheck(self, r: Received, inflated: list[SpooledDataset]) -> Buffer:
        """The cheap refusals, before any byte is written. Returns the plain dataset:
        as received, or inflated to a file in the store's temporary folder if it was
        sent deflated (added to ``inflated`` for the caller to remove; the size limit
        holds for the inflated size)."""
        size = len(r.dataset)
        if size > self.config.max_instance_bytes:
            raise BadInstance(StoreStatus.REFUSED_DATASET_TOO_LARGE,
                              f"dataset of {size} bytes exceeds the limit of "
                              f"{self.config.max_instance_bytes} (LASTMILE_DICOM_MAX_INSTANCE_MB)",
                              code="too_large")
        self.store.check_space(size)
        if r.transfer_syntax_uid == DEFLATED:
            spool = inflate_to_disk(_pieces(r.dataset), self.config.max_instance_bytes,
                                    self.store.tmp)
            inflated.append(spool)
            plain = check_structure(spool.view(), ExplicitVRLittleEndian)
        else:
            buffer = r.dataset.view() if isinstance(r.dataset, SpooledDataset) else r.dataset
            plain = check_structure(buffer, r.transfer_syntax_uid)
        if not r.sop_instance_uid:
            raise BadInstance(StoreStatus.ERROR_MISSING_REQUIRED_UID,
                              "the request has no Affected SOP Instance UID")
        return plain

    def _admit(self, r: Received, plain: Buffer) -> tuple[InstanceFacts, Dataset]:
        """Decode the header and check it against the request (raises ``BadInstance``)."""
        ds = parse(plain, r.transfer_syntax_uid)
        problems = undeclared_text(ds)  # first: reading a value decodes it in place
        f = facts(ds, self.secret)
        if problems:
            f = without_text(f, problems)
        if f.sop_class_uid != r.sop_class_uid:
            raise _BadWithFacts(StoreStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                f"dataset SOP Class {f.sop_class_uid} differs from the "
                                f"association's {r.sop_class_uid}", f)
        if f.sop_instance_uid != r.sop_instance_uid:
            raise _BadWithFacts(StoreStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                f"dataset SOP Instance {f.sop_instance_uid} differs from the "
                                f"request's {r.sop_instance_uid}", f)
        return f, ds

    # ------------------------------------------------------------------ store

    def _hash_and_write(self, sop_instance_uid: str, meta: bytes,
                        dataset: bytes | SpooledDataset) -> tuple[str, StoredFile | None, bool]:
        """Hash, and write the file unless these bytes are stored already. Returns
        (sha256, the file written or None, whether the log knows these bytes). A new file
        is complete under its final name but not yet synced (``store.sync``). A dataset
        received to disk is read in pieces for both, never whole into memory."""
        h = hashlib.sha256(meta)
        for piece in _pieces(dataset):
            h.update(piece)
        sha = h.hexdigest()
        size = len(meta) + len(dataset)

        def chunks() -> Iterator[bytes]:
            yield meta
            yield from _pieces(dataset)

        if self.index.version_of(sop_instance_uid, sha) is None:
            return sha, self.store.put(chunks(), sha, durable=False, size=size), False
        if self.store.find(sha, size) is not None:
            return sha, None, True
        # the log has the event but the file is gone or short (a power failure between
        # the event's ack and the file's sync; the sender got no Success and retries)
        log.warning("repairing the stored file of %s from the sender's retry", sha[:12])
        return sha, self.store.put(chunks(), sha, size=size), True

    def _store_and_publish(self, r: Received, plain: Buffer) -> Outcome:
        """Called holding the SOP Instance's lock: check, write, record.

        Success needs the file durable AND the event acknowledged; the two fsyncs (ours of
        the file, the log's of the event) run at the same time. The file is complete under
        its final name before the event is published, so a crash of this process never
        leaves an event without its bytes; a power failure between the ack and the sync
        can, and then the sender, which was not answered, resends and the file is repaired.
        """
        assert r.sop_instance_uid is not None
        f, ds = self._admit(r, plain)
        self._check_identity(f)
        meta = file_meta(r.sop_class_uid, r.sop_instance_uid, r.transfer_syntax_uid)
        sha, stored, known = self._hash_and_write(r.sop_instance_uid, meta, r.dataset)
        actor = f"{self.config.actor_prefix}:{r.called_ae}"
        if known:
            dup = InstanceDuplicated.new(
                actor=actor, study_uid=f.study_uid, sop_instance_uid=f.sop_instance_uid,
                sha256=sha, calling_ae=r.calling_ae, called_ae=r.called_ae,
                association_id=r.association_id,
            )
            self._record(f, [dup])
            return Outcome(StoreStatus.SUCCESS, "duplicate of a stored instance",
                           f.study_uid, (dup,))
        assert stored is not None
        version = self.index.next_version(f.sop_instance_uid)
        try:
            events = self._events(r, f, ds, stored, version, actor)
            acked = self._start_record(f, events)
        except BaseException:
            self.store.discard(stored)
            raise
        sync_failed: StoreError | None = None
        try:
            self.store.sync(stored)  # while the log stores and fsyncs the event
        except StoreError as exc:
            sync_failed = exc
        try:
            acked()
        except BaseException:
            self.store.discard(stored)
            raise
        self.index.observe(events[-1])  # type: ignore[arg-type]
        if sync_failed is not None:
            # the event is recorded and the file complete and in place, so it stays; the
            # sender is told to retry (and gets a duplicate, or a repair)
            raise sync_failed
        return Outcome(StoreStatus.SUCCESS, "stored", f.study_uid, tuple(events), stored)

    def _check_identity(self, f: InstanceFacts) -> None:
        """One SOP Instance UID is one object (PS3.3 C.12.1.1.1). Other bytes under a
        known UID in the same study and series are a new version of it (stored, version
        + 1); in another series or study they are an identity conflict: refused with
        Duplicate SOP Instance (0x0111), and the first object is kept."""
        home = self.index.home(f.sop_instance_uid)
        if home is None or home == (f.study_uid, f.series_uid):
            return
        where = "study" if home[0] != f.study_uid else "series"
        raise _BadWithFacts(
            StoreStatus.REFUSED_DUPLICATE_SOP_INSTANCE,
            f"identity conflict: this SOP Instance UID is already stored in another {where}; "
            "the first object is kept (PS3.3 C.12.1.1.1: one UID, one object)",
            f, code="identity_conflict", first=home)

    def _record(self, f: InstanceFacts, events: list[Event]) -> None:
        self._start_record(f, events)()

    def _start_record(self, f: InstanceFacts, events: list[Event]) -> Callable[[], None]:
        try:
            wait = self.publish.start(events)
        except EventsError as exc:
            raise _RecordFailed(exc, f) from None

        def acked() -> None:
            try:
                wait()
            except EventsError as exc:
                raise _RecordFailed(exc, f) from None
        return acked

    def _events(self, r: Received, f: InstanceFacts, ds: Dataset, stored: StoredFile,
                version: int, actor: str) -> list[Event]:
        events: list[Event] = []
        rules = self.rules()
        pipeline = rules.ae_titles().get(r.called_ae)
        if pipeline is None:  # the general AE: rules decide, once per series
            key = (f.study_uid, f.series_uid, r.called_ae, rules.sha256)
            with self._routes_lock:
                known = self._routes.get(key)
            if known is None:
                decision = route(rules, tag_values(ds, rules.tags()))
                eid = deterministic_id("route", f.study_uid, f.series_uid, r.called_ae,
                                       ",".join(decision.rule_ids))
                if decision.pipelines:
                    events.append(RouteMatched.new(
                        actor=actor, study_uid=f.study_uid, event_id=eid,
                        rule_ids=decision.rule_ids, pipelines=decision.pipelines,
                        called_ae=r.called_ae, reasons=decision.reasons,
                        series_uid=f.series_uid,
                    ))
                else:
                    why = ("; ".join(decision.reasons) if decision.reasons
                           else "no rule matched and there is no fallback rule")
                    events.append(RouteUnmatched.new(
                        actor=actor, study_uid=f.study_uid, event_id=eid,
                        called_ae=r.called_ae, reason=why, series_uid=f.series_uid,
                    ))
                with self._routes_lock:
                    self._routes[key] = decision.pipelines
                    while len(self._routes) > self.config.route_cache_size:
                        self._routes.popitem(last=False)
        events.append(InstanceStored.new(
            actor=actor,
            study_uid=f.study_uid,
            pipeline=pipeline,
            event_id=deterministic_id(f.sop_instance_uid, stored.sha256),
            sop_instance_uid=f.sop_instance_uid,
            sop_class_uid=f.sop_class_uid,
            series_uid=f.series_uid,
            transfer_syntax_uid=r.transfer_syntax_uid,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            store_key=stored.store_key,
            version=version,
            calling_ae=r.calling_ae,
            called_ae=r.called_ae,
            source_address=r.source_address,
            association_id=r.association_id,
            modality=f.modality,
            series_number=f.series_number,
            series_description=f.series_description,
            instance_number=f.instance_number,
            manufacturer=f.manufacturer,
            manufacturer_model=f.manufacturer_model,
            station_name=f.station_name,
            institution=f.institution,
            patient_pseudonym=f.patient_pseudonym,
            patient_sex=f.patient_sex,
            age_band=f.age_band,
            study_date=f.study_date,
            accession_pseudonym=f.accession_pseudonym,
            pixel_spacing_mm=f.pixel_spacing_mm,
            text_encoding_problems=f.text_encoding_problems,
            **instance_evidence(ds),  # type: ignore[arg-type]
        ))
        return events

    # ------------------------------------------------------------------ refuse

    def _reject(self, r: Received, status: StoreStatus, reason: str,
                f: InstanceFacts | None, *, code: str | None = None,
                first: tuple[str, str] | None = None) -> Outcome:
        h = hashlib.sha256()
        for piece in _pieces(r.dataset):
            h.update(piece)
        rejected = InstanceRejected.new(
            actor=f"{self.config.actor_prefix}:{r.called_ae}",
            study_uid=f.study_uid if f else None,
            reason=reason[:1000],
            status=int(status),
            status_name=status.name,
            calling_ae=r.calling_ae,
            called_ae=r.called_ae,
            source_address=r.source_address,
            sop_instance_uid=(f.sop_instance_uid if f else r.sop_instance_uid),
            sop_class_uid=r.sop_class_uid,
            sha256=h.hexdigest(),
            size_bytes=len(r.dataset),
            reason_code=code,
            first_study_uid=first[0] if first else None,
            first_series_uid=first[1] if first else None,
        )
        try:
            self.publish([rejected])
        except EventsError as exc:
            log.error("could not record the rejection of %s (%s): %s",
                      r.sop_instance_uid, status.name, exc)
            return Outcome(status, reason, rejected.study_uid)
        log.warning("rejected %s from %s: %s (%s)", r.sop_instance_uid, r.calling_ae,
                    status.name, reason)
        return Outcome(status, reason, rejected.study_uid, (rejected,))


def _pieces(dataset: bytes | SpooledDataset) -> Iterator[bytes]:
    if isinstance(dataset, SpooledDataset):
        yield from dataset.pieces()
    else:
        yield dataset
