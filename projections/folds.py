"""Pure folds: one event (with its stream sequence) -> the rows it adds to the read model.

Nothing here touches a database. ``fold(seq, event)`` returns ``(table, row)`` pairs,
where ``row`` is a tuple in the column order of ``projections.schema``; ``RowBatch``
collects them per table for the writer. Every table is append-only, so folding is a
pure function of each event and a rebuild from the first event reproduces the
same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from events.base import Event
from events.catalogue import (
    AssociationAborted,
    AssociationOpened,
    AssociationReleased,
    CaseAssigned,
    CaseViewed,
    ConnectionRefused,
    DeliveryFailed,
    DriftAlertRaised,
    EditSubmitted,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    InferenceSkipped,
    InferenceStarted,
    InstanceDuplicated,
    InstanceRejected,
    InstanceStored,
    LogRedacted,
    MeasurementRecomputed,
    OperatorFinished,
    PasswordChanged,
    PipelineDeployed,
    PipelineRetired,
    PipelineStageChanged,
    PriorRetrieved,
    PriorsSearched,
    PublishFailed,
    QcPassed,
    QcRejected,
    ResultMarkedStale,
    ResultPublished,
    ResultSuperseded,
    ResultWithdrawn,
    ReviewSubmitted,
    RouteMatched,
    RouteUnmatched,
    SeriesCompleted,
    SeriesSelected,
    SessionEnded,
    SignedIn,
    SignInFailed,
    SigninFailed,
    SigninSucceeded,
    StudyAmended,
    StudyCompleted,
    StudyNotRun,
    StudyRerunRequested,
    UserChanged,
)
from events.errors import CodecError

Row = tuple[Any, ...]
Change = tuple[str, Row]


def _env(seq: int, ev: Event) -> Row:
    return (seq, ev.event_id, ev.occurred_at, ev.study_uid, ev.pipeline)


def _iso(value: str | None) -> datetime | None:
    """An ISO-8601 time from a payload, as UTC; a malformed one becomes null, not an error
    (the fold must never stop on one odd field)."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _stored(seq: int, ev: InstanceStored) -> list[Change]:
    return [("instances", (
        *_env(seq, ev), "stored", ev.sop_instance_uid, ev.series_uid, ev.calling_ae,
        ev.called_ae, ev.modality, ev.series_description, ev.manufacturer,
        ev.manufacturer_model, ev.institution, ev.station_name, ev.patient_pseudonym,
        ev.patient_sex, ev.age_band, ev.size_bytes, ev.version, ev.pixel_spacing_mm,
        None, None,
    ))]


def _rejected(seq: int, ev: InstanceRejected) -> list[Change]:
    return [("instances", (
        *_env(seq, ev), "rejected", ev.sop_instance_uid, None, ev.calling_ae, ev.called_ae,
        None, None, None, None, None, None, None, None, None, ev.size_bytes, None, None,
        ev.reason, ev.status_name,
    ))]


# --- receiver hardening (issues 14 and 18): a refused connection names no study and no
# instance; it stays in the log (``lastmile replay``) and adds no row to a read model
def _connection_refused(seq: int, ev: ConnectionRefused) -> list[Change]:
    return []


def _duplicated(seq: int, ev: InstanceDuplicated) -> list[Change]:
    return [("instances", (
        *_env(seq, ev), "duplicated", ev.sop_instance_uid, None, ev.calling_ae, ev.called_ae,
        None, None, None, None, None, None, None, None, None, None, None, None, None, None,
    ))]


def _series(seq: int, ev: SeriesCompleted) -> list[Change]:
    return [("series", (*_env(seq, ev), ev.series_uid, str(ev.reason), ev.instance_count,
                        ev.modality, ev.series_description))]


def _study(seq: int, ev: StudyCompleted) -> list[Change]:
    return [("study_completions", (
        *_env(seq, ev), str(ev.reason), ev.series_count, ev.instance_count, ev.latency_s,
        _iso(ev.first_instance_at), _iso(ev.last_instance_at), ev.patient_pseudonym,
    )), ("completion_evidence", (
        *_env(seq, ev), "completed", str(ev.reason), ev.partial, ev.instance_count, None,
        None, None, "\n".join(ev.evidence) or None,
    ))]


def _amended(seq: int, ev: StudyAmended) -> list[Change]:
    return [("study_amendments", (*_env(seq, ev), ev.new_instance_count,
                                  len(ev.series_uids), ev.rerun)),
            ("completion_evidence", (*_env(seq, ev), "amended",
                                     str(ev.reason) if ev.reason else None, ev.partial,
                                     ev.instance_count, ev.rerun, ev.stale, ev.pixels_changed,
                                     "\n".join(ev.evidence) or None))]


def _association(seq: int, ev: AssociationOpened | AssociationReleased | AssociationAborted,
                 ) -> list[Change]:
    kind = {AssociationOpened: "opened", AssociationReleased: "released",
            AssociationAborted: "aborted"}[type(ev)]
    return [("associations", (
        *_env(seq, ev), ev.association_id, kind, ev.calling_ae, ev.called_ae,
        ev.aborted_by if isinstance(ev, AssociationAborted) else None,
        None if isinstance(ev, AssociationOpened) else ev.instance_count,
        None if isinstance(ev, AssociationOpened) else ev.duration_s,
    ))]


def _superseded(seq: int, ev: ResultSuperseded) -> list[Change]:
    return [("result_changes", (*_env(seq, ev), ev.run_key, "superseded", ev.superseded_by,
                                ev.reason, ev.partial, None))]


def _stale(seq: int, ev: ResultMarkedStale) -> list[Change]:
    return [("result_changes", (*_env(seq, ev), ev.run_key, "stale", None, ev.reason, None,
                                None))]


def _withdrawn(seq: int, ev: ResultWithdrawn) -> list[Change]:
    return [("result_changes", (*_env(seq, ev), ev.run_key, "withdrawn", None,
                                ev.reason_code, None, ev.destination))]


def _matched(seq: int, ev: RouteMatched) -> list[Change]:
    rules = ",".join(ev.rule_ids)
    reason = "; ".join(ev.reasons) or None
    return [("routes", (*_env(seq, ev), True, p, rules, ev.called_ae, reason))
            for p in (ev.pipelines or (None,))]


def _unmatched(seq: int, ev: RouteUnmatched) -> list[Change]:
    return [("routes", (*_env(seq, ev), False, None, None, ev.called_ae, ev.reason))]


def _deployed(seq: int, ev: PipelineDeployed) -> list[Change]:
    return [("pipeline_changes", (*_env(seq, ev), "deployed", ev.name, ev.version,
                                  str(ev.stage), None, ev.reason, ev.file_sha256,
                                  ev.model_sha256, ev.ae_title, ev.runtime_target_s))]


def _staged(seq: int, ev: PipelineStageChanged) -> list[Change]:
    return [("pipeline_changes", (*_env(seq, ev), "stage_changed", ev.name, ev.version,
                                  str(ev.to_stage), str(ev.from_stage), ev.reason, None,
                                  None, None, None))]


def _retired(seq: int, ev: PipelineRetired) -> list[Change]:
    return [("pipeline_changes", (*_env(seq, ev), "retired", ev.name, ev.version, None, None,
                                  ev.reason, None, None, None, None))]


_NO_RUN = (None,) * 8  # model_name .. progression when not a completion


def _requested(seq: int, ev: InferenceRequested) -> list[Change]:
    return [("inference", (*_env(seq, ev), ev.run_key, "requested", None, None, None, None,
                           None, ev.model_sha256, str(ev.stage) if ev.stage else None,
                           None, None, None, None, None, ev.trigger, None, None, None))]


def _started(seq: int, ev: InferenceStarted) -> list[Change]:
    return [("inference", (*_env(seq, ev), ev.run_key, "started", ev.attempt, ev.worker_id,
                           ev.runtime, *_NO_RUN, None, None, None, None, None))]


def _completed(seq: int, ev: InferenceCompleted) -> list[Change]:
    env = _env(seq, ev)
    out: list[Change] = [("inference", (
        *env, ev.run_key, "completed", None, None, ev.runtime, ev.model_name,
        ev.model_version, ev.model_sha256, None, ev.duration_s, ev.inference_s, ev.score,
        ev.progression, None, None, None, ev.patient_pseudonym, ev.study_date,
    ))]
    for m in ev.measurements:
        out.append(("measurements", (*env, ev.run_key, "ai", None, m.name, m.value, m.unit,
                                     m.label)))
    for f in ev.findings:
        out.append(("findings", (*env, ev.run_key, f.label, f.classification, f.probability)))
    return out


def _skipped(seq: int, ev: InferenceSkipped) -> list[Change]:
    return [("inference", (*_env(seq, ev), ev.run_key, "skipped", None, None, None,
                           *_NO_RUN, None, ev.reason, None, None, None))]


def _failed(seq: int, ev: InferenceFailed) -> list[Change]:
    return [("inference", (*_env(seq, ev), ev.run_key, "failed", ev.attempt, None, None,
                           *_NO_RUN, ev.operator, ev.error, ev.final, None, None))]


def _operator(seq: int, ev: OperatorFinished) -> list[Change]:
    return [("operators", (*_env(seq, ev), ev.run_key, ev.operator, ev.index, ev.duration_s))]


def _published(seq: int, ev: ResultPublished) -> list[Change]:
    return [("publications", (*_env(seq, ev), ev.run_key, True, ev.destination, ev.kind,
                              ev.attempt, False, None))]


def _publish_failed(seq: int, ev: PublishFailed) -> list[Change]:
    return [("publications", (*_env(seq, ev), ev.run_key, False, ev.destination, None,
                              ev.attempt, ev.will_retry, ev.error))]


def _recomputed(seq: int, ev: MeasurementRecomputed) -> list[Change]:
    env = _env(seq, ev)
    out: list[Change] = [
        ("measurements", (*env, ev.run_key, "edit", ev.edit_event_id, m.name, m.value, m.unit,
                          m.label))
        for m in ev.measurements
    ]
    out.extend(("dice", (*env, ev.run_key, ev.edit_event_id, label, value))
               for label, value in sorted(ev.dice.items()))
    return out


def _qc_passed(seq: int, ev: QcPassed) -> list[Change]:
    return [("qc", (*_env(seq, ev), ev.run_key, True, None, ev.seconds_on_case))]


def _qc_rejected(seq: int, ev: QcRejected) -> list[Change]:
    return [("qc", (*_env(seq, ev), ev.run_key, False, ev.reason, ev.seconds_on_case))]


def _assigned(seq: int, ev: CaseAssigned) -> list[Change]:
    return [("assignments", (*_env(seq, ev), ev.run_key, ev.reader, ev.blinded_label))]


def _review(seq: int, ev: ReviewSubmitted) -> list[Change]:
    env = _env(seq, ev)
    out: list[Change] = [("reviews", (*env, ev.run_key, ev.reader, ev.confidence,
                                      ev.seconds_on_case, ev.blinded_label, ev.source))]
    for label in sorted(set(ev.reads) | set(ev.agree)):
        out.append(("review_reads", (*env, ev.run_key, ev.reader, label, ev.reads.get(label),
                                     ev.agree.get(label), ev.blinded_label)))
    return out


def _edit(seq: int, ev: EditSubmitted) -> list[Change]:
    return [("edits", (*_env(seq, ev), ev.run_key, ev.reader, ev.store_key, ev.sha256,
                       ev.source))]


def _drift(seq: int, ev: DriftAlertRaised) -> list[Change]:
    return [("drift_alerts", (*_env(seq, ev), ev.feature, ev.psi, ev.threshold,
                              ev.window_start, ev.window_end, ev.baseline_start,
                              ev.baseline_end))]


def _dead(seq: int, ev: DeliveryFailed) -> list[Change]:
    return [("dead_letters", (*_env(seq, ev), ev.consumer, ev.subject, ev.stream_sequence,
                              ev.deliveries, ev.reason, ev.original_type))]


def _not_run(seq: int, ev: StudyNotRun) -> list[Change]:
    return [("study_runs_by_hand", (*_env(seq, ev), "not_run", ev.reason_code.value,
                                    ev.reason, ev.actor))]


def _rerun(seq: int, ev: StudyRerunRequested) -> list[Change]:
    return [("study_runs_by_hand", (*_env(seq, ev), "rerun_requested", None, ev.why,
                                    ev.actor))]


def _not_projected(seq: int, ev: Event) -> list[Change]:
    return []


# issue 18: sign-in and case views (the "access" table)
def _signin(seq: int, ev: SigninSucceeded) -> list[Change]:
    return [("access", (*_env(seq, ev), "signin", ev.user, ev.address, ev.method, None))]


def _signin_failed(seq: int, ev: SigninFailed) -> list[Change]:
    return [("access", (*_env(seq, ev), "signin_failed", ev.user, ev.address,
                        str(ev.reason), None))]


def _session_ended(seq: int, ev: SessionEnded) -> list[Change]:
    return [("access", (*_env(seq, ev), "session_ended", ev.user, ev.address,
                        str(ev.reason), None))]


def _password_changed(seq: int, ev: PasswordChanged) -> list[Change]:
    return [("access", (*_env(seq, ev), "password_changed", ev.user, ev.address, None,
                        None))]


def _viewed(seq: int, ev: CaseViewed) -> list[Change]:
    return [("access", (*_env(seq, ev), "viewed", ev.reader, None, ev.page, ev.run_key))]


FOLDS: dict[type[Event], Callable[[int, Any], list[Change]]] = {
    InstanceStored: _stored,
    InstanceRejected: _rejected,
    InstanceDuplicated: _duplicated,
    ConnectionRefused: _connection_refused,  # receiver hardening (issues 14 and 18)
    SeriesCompleted: _series,
    StudyCompleted: _study,
    StudyAmended: _amended,
    RouteMatched: _matched,
    RouteUnmatched: _unmatched,
    AssociationOpened: _association,
    AssociationReleased: _association,
    AssociationAborted: _association,
    PipelineDeployed: _deployed,
    PipelineStageChanged: _staged,
    PipelineRetired: _retired,
    InferenceRequested: _requested,
    InferenceStarted: _started,
    OperatorFinished: _operator,
    InferenceCompleted: _completed,
    InferenceSkipped: _skipped,
    InferenceFailed: _failed,
    ResultPublished: _published,
    PublishFailed: _publish_failed,
    ResultSuperseded: _superseded,
    ResultMarkedStale: _stale,
    ResultWithdrawn: _withdrawn,
    MeasurementRecomputed: _recomputed,
    StudyNotRun: _not_run,  # live deployment, re-runs (issue 16)
    StudyRerunRequested: _rerun,
    SeriesSelected: _not_projected,  # every series and why: in the study's audit
    # priors from the PACS (issue 16 #7): in the studies' audits; a failed fetch is also an
    # ``inference failed`` of operator ``fetch_priors``, which the reliability page counts
    PriorsSearched: _not_projected,
    PriorRetrieved: _not_projected,
    QcPassed: _qc_passed,
    QcRejected: _qc_rejected,
    CaseAssigned: _assigned,
    ReviewSubmitted: _review,
    EditSubmitted: _edit,
    SigninSucceeded: _signin,
    SigninFailed: _signin_failed,
    SessionEnded: _session_ended,
    PasswordChanged: _password_changed,
    CaseViewed: _viewed,
    DriftAlertRaised: _drift,
    DeliveryFailed: _dead,
    # access and redaction facts (issue 18): in the log for audit, no read-model rows yet
    SignedIn: _not_projected,
    SignInFailed: _not_projected,
    UserChanged: _not_projected,
    LogRedacted: _not_projected,
}


def fold(seq: int, item: Event | CodecError) -> list[Change]:
    """The rows one log entry adds. An undecodable message is kept as a row too, so a
    bad message is visible in the read model instead of silently skipped."""
    if isinstance(item, CodecError):
        return [("undecodable", (seq, str(item)[:2000]))]
    return FOLDS[type(item)](seq, item)


class RowBatch:
    """Rows of consecutive log entries, grouped per table, and the sequences they cover."""

    __slots__ = ("rows", "first", "last", "events", "seqs")

    def __init__(self) -> None:
        self.rows: dict[str, list[Row]] = {}
        self.first: int | None = None
        self.last: int | None = None
        self.events = 0
        self.seqs: list[int] = []

    def add(self, seq: int, item: Event | CodecError) -> None:
        rows = self.rows
        for table, row in fold(seq, item):
            bucket = rows.get(table)
            if bucket is None:
                rows[table] = [row]
            else:
                bucket.append(row)
        if self.first is None:
            self.first = seq
        self.last = seq
        self.events += 1
        self.seqs.append(seq)

    def extend(self, items: Iterable[tuple[int, Event | CodecError]]) -> RowBatch:
        for seq, item in items:
            self.add(seq, item)
        return self

    def __len__(self) -> int:
        return self.events
