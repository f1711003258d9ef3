"""Priors from the PACS: find a patient's earlier studies (C-FIND) and have the PACS send
them to Lastmile's own receiver (C-MOVE), PS3.4 Annex C (Query/Retrieve, Study Root).

A longitudinal pipeline compares the current exam with the same patient's earlier ones;
a site will not resend them. When the log holds no earlier result, the worker asks the
PACS (``engine.worker``):

1. ``find_priors``: one C-FIND at STUDY level with PatientID, ModalitiesInStudy and a
   StudyDate range ending the day before the current study; only studies dated before
   it are kept (a PACS may ignore the range), the current study never.
2. ``choose``: the earliest (baseline) and the latest (prior) of them, as
   ``engine.ops.longitudinal`` compares with both.
3. ``retrieve``: one C-MOVE per chosen study to ``move_destination``, an AE title of
   Lastmile's receiver that the PACS knows (host and port are the PACS's configuration,
   PS3.4 C.4.2). The PACS sends the instances by C-STORE, so they enter through the
   normal ingest path (stored, de-duplicated, an ``instance stored`` event each) and the
   receiver answers each C-STORE only once its event is acknowledged: when the C-MOVE
   returns, the instances are in the log.

Blocking (pynetdicom is synchronous): the worker calls these in a thread. Statuses are
named (PS3.4 C.4.1.1.4 and C.4.2.1.5), never bare numbers. Whatever stops an answer
(connection refused, no answer, association rejected, a failure status, sub-operations
that failed) raises ``PriorFetchError``, an edge failure: retried here ``retries``
times, then by the worker's redelivery, with a bound. "The PACS holds no earlier study"
is an answer, not an error. The PatientID is sent to the PACS and nowhere else: no
message here or in the error quotes a DICOM value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from engine.errors import PriorFetchError
from engine.pacs import PacsAddress, format_address, tls_args
from events.dicom_dates import DicomValueError, format_da, parse_da

#: C-FIND and C-MOVE: a pending response (one match, or sub-operations still running)
_PENDING = frozenset({0xFF00, 0xFF01})
STATUS_SUCCESS = 0x0000
#: C-MOVE finished but some sub-operations failed or gave warnings (PS3.4 C.4.2.1.5)
MOVE_SUBOPERATIONS_FAILED = 0xB000


@dataclass(frozen=True)
class PriorSource:
    """The PACS asked for priors, and how.

    ``move_destination``: the AE title the PACS sends retrieved studies to (it must map
    it to Lastmile's receiver); None = the pipeline's own AE title, so a prior is
    received and routed as if it had been sent to the pipeline.
    """

    address: PacsAddress
    move_destination: str | None = None
    retries: int = 2
    retry_delay_s: float = 1.0
    timeout_s: float = 30.0
    max_priors: int = 2  # the earliest and the latest earlier study


@dataclass(frozen=True)
class PriorStudy:
    study_uid: str
    study_date: str  # YYYYMMDD


@dataclass(frozen=True)
class Retrieved:
    """The C-MOVE's final counts (PS3.4 C.4.2.1.4: Number of ... Sub-operations)."""

    completed: int
    failed: int
    warning: int


def status_name(code: int, table: dict[int, tuple[str, str]]) -> str:
    entry = table.get(code)
    category = code_to_category(code)
    return f"{category}: {entry[1]}" if entry else f"{category} (0x{code:04X})"


def _day(value: object) -> date:
    day = parse_da(value, "StudyDate")
    if day is None:
        raise DicomValueError("StudyDate", "DA", "empty")
    return day


def day_before(study_date: str) -> str:
    """``20260301`` -> ``20260228``; raises ``DicomValueError`` for an empty or
    unreadable date."""
    return format_da(_day(study_date) - timedelta(days=1))


def find_query(patient_id: str, before: str, modality: str | None) -> Dataset:
    """The C-FIND identifier (PS3.4 C.6.2, Study Root, STUDY level): the patient's
    studies dated up to the day before ``before`` (``YYYYMMDD``), of ``modality``."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id
    q.StudyDate = f"-{day_before(before)}"
    q.ModalitiesInStudy = modality or ""
    q.StudyInstanceUID = ""
    return q


def earlier_matches(matches: Sequence[Dataset], before: str, current_study_uid: str
                    ) -> list[PriorStudy]:
    """The matches dated before ``before``, earliest first; the current study, a match
    without a StudyInstanceUID and one whose date cannot be read are left out."""
    limit = _day(before)
    out: dict[str, PriorStudy] = {}
    for m in matches:
        uid = str(m.get("StudyInstanceUID", "") or "")
        try:
            day = _day(m.get("StudyDate"))
        except DicomValueError:
            continue
        if uid and uid != current_study_uid and day < limit:
            out[uid] = PriorStudy(uid, format_da(day))
    return sorted(out.values(), key=lambda p: (p.study_date, p.study_uid))


def choose(priors: Sequence[PriorStudy], max_priors: int = 2) -> list[PriorStudy]:
    """The baseline (earliest) and prior (latest) first, then others latest first, up to
    ``max_priors``; ``priors`` earliest first (``earlier_matches``)."""
    if not priors or max_priors < 1:
        return []
    order = [priors[0], priors[-1], *reversed(priors[1:-1])]
    seen: dict[str, PriorStudy] = {}
    for p in order:
        seen.setdefault(p.study_uid, p)
    return list(seen.values())[:max_priors]


def _associate(source: PriorSource, context: str) -> Association:
    ae = AE(ae_title=source.address.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = source.timeout_s
    ae.add_requested_context(context)
    assoc = ae.associate(source.address.host, source.address.port,
                         ae_title=source.address.ae_title,
                         tls_args=tls_args(source.address.host))
    if not assoc.is_established:
        why = ("rejected the association" if assoc.is_rejected
               else "refused the connection or did not answer")
        raise PriorFetchError(f"{format_address(source.address)} {why}")
    if not assoc.accepted_contexts:
        assoc.release()
        raise PriorFetchError(f"{format_address(source.address)} accepted no "
                              "presentation context for Study Root Query/Retrieve")
    return assoc


def _find_once(source: PriorSource, query: Dataset) -> list[Dataset]:
    where = format_address(source.address)
    assoc = _associate(source, StudyRootQueryRetrieveInformationModelFind)
    matches: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind):
            if not status or "Status" not in status:
                raise PriorFetchError(f"{where}: no C-FIND response (timeout or abort)")
            code = int(status.Status)
            if code in _PENDING:
                if identifier is not None:
                    matches.append(identifier)
            elif code != STATUS_SUCCESS:
                raise PriorFetchError(f"{where} answered the C-FIND with "
                                      f"{status_name(code, QR_FIND_SERVICE_CLASS_STATUS)}")
    except (RuntimeError, ValueError, OSError):
        raise PriorFetchError(f"{where}: the association ended during the C-FIND") from None
    finally:
        if assoc.is_established:
            assoc.release()
    return matches


def _move_once(source: PriorSource, study_uid: str, destination: str) -> Retrieved:
    where = format_address(source.address)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    assoc = _associate(source, StudyRootQueryRetrieveInformationModelMove)
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_move(
                q, destination, StudyRootQueryRetrieveInformationModelMove):
            if not status or "Status" not in status:
                raise PriorFetchError(f"{where}: no C-MOVE response (timeout or abort)")
            if int(status.Status) not in _PENDING:
                final = status
    except (RuntimeError, ValueError, OSError):
        raise PriorFetchError(f"{where}: the association ended during the C-MOVE") from None
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise PriorFetchError(f"{where}: the C-MOVE ended without a final status")
    code = int(final.Status)
    counts = Retrieved(int(final.get("NumberOfCompletedSuboperations", 0) or 0),
                       int(final.get("NumberOfFailedSuboperations", 0) or 0),
                       int(final.get("NumberOfWarningSuboperations", 0) or 0))
    if code == STATUS_SUCCESS and counts.failed == 0:
        return counts
    raise PriorFetchError(
        f"{where} answered the C-MOVE to {destination} with "
        f"{status_name(code, QR_MOVE_SERVICE_CLASS_STATUS)} ({counts.completed} sent, "
        f"{counts.failed} failed)")


def _with_retries(work: Callable[[], object], source: PriorSource,
                  on_retry: Callable[[int, str], None] | None) -> object:
    last = ""
    for attempt in range(1, source.retries + 2):
        try:
            return work()
        except PriorFetchError as exc:
            last = str(exc)
        except (OSError, RuntimeError) as exc:
            last = f"{format_address(source.address)} unreachable ({type(exc).__name__})"
        if attempt <= source.retries:
            if on_retry is not None:
                on_retry(attempt, last)
            time.sleep(source.retry_delay_s * attempt)
    tries = source.retries + 1
    raise PriorFetchError(f"{last} (after {tries} attempt{'s' if tries > 1 else ''})")


def find_priors(source: PriorSource, *, patient_id: str, before: str,
                modality: str | None, current_study_uid: str,
                on_retry: Callable[[int, str], None] | None = None) -> list[PriorStudy]:
    """The patient's studies in the PACS dated before ``before`` (``YYYYMMDD``), earliest
    first (``earlier_matches``); [] when it holds none. Raises ``PriorFetchError`` when
    the PACS cannot be asked after ``source.retries`` retries."""
    query = find_query(patient_id, before, modality)
    matches = _with_retries(lambda: _find_once(source, query), source, on_retry)
    assert isinstance(matches, list)
    return earlier_matches(matches, before, current_study_uid)


def retrieve(source: PriorSource, study_uid: str, destination: str,
             on_retry: Callable[[int, str], None] | None = None) -> Retrieved:
    """C-MOVE one study to ``destination`` (module doc); raises ``PriorFetchError`` when
    it is not wholly sent after ``source.retries`` retries (sending again is harmless:
    the receiver records identical instances as duplicates)."""
    out = _with_retries(lambda: _move_once(source, study_uid, destination), source,
                        on_retry)
    assert isinstance(out, Retrieved)
    return out
