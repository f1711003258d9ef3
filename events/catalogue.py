"""The event catalogue: every fact Lastmile records, as a frozen typed struct.

Names are past tense and dotted ``<domain>.<entity>.<what happened>``; the dotted
name is the stable identity stored in the log (README, "The event log").

Patient identity never appears here. A patient is referred to only by
``patient_pseudonym`` (HMAC-SHA256 with the site secret, ``events.pseudonym``);
subgroup analysis gets a sex code and a ten-year age band, never a birth date.
DICOM UIDs may appear: PACS deep links need them, and exports can remap them.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from events.base import Event

# --------------------------------------------------------------------------- shared


class CompletionReason(StrEnum):
    """Why a study (or series) was declared complete. Recorded, never guessed silently."""

    QUIET_PERIOD = "quiet_period"
    EXPECTED_SERIES = "expected_series"
    ASSOCIATION_RELEASED = "association_released"
    FORCED = "forced"
    MAX_WAIT = "max_wait"
    #: a released association carried every instance of the study (first to last)
    WHOLE_STUDY_RELEASED = "whole_study_released"
    #: the counts the objects declare (NumberOfStudyRelatedInstances, ...) are all present
    DECLARED_COUNTS = "declared_counts"


class Stage(StrEnum):
    """A deployed pipeline's stage: the paper's test-VM-then-production path."""

    STAGING = "staging"
    SILENT = "silent"
    VALIDATION = "validation"
    CLINICAL = "clinical"


class SeriesSummary(msgspec.Struct, frozen=True, kw_only=True):
    series_uid: str
    modality: str | None = None
    series_description: str | None = None
    instance_count: int = 0


class Measurement(msgspec.Struct, frozen=True, kw_only=True):
    """One named quantity of a result: a volume in mL, a score, a % change."""

    name: str
    value: float
    unit: str
    label: str | None = None


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """A classification or detection: e.g. left hip = fracture, p=0.93, with a box."""

    label: str
    classification: str
    probability: float | None = None
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in pixels
    sop_instance_uid: str | None = None


# --------------------------------------------------------------------------- ingest


class InstanceStored(Event, frozen=True, kw_only=True, tag="ingest.instance.stored"):
    """A DICOM instance is durable in the content-addressed store.

    v2 (current): ``size`` renamed ``size_bytes``; ``store_key`` replaces an absolute
    ``path`` so a store can move (see ``events.upcasting``).
    """

    SCHEMA_VERSION = 2

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    transfer_syntax_uid: str
    sha256: str
    size_bytes: int
    store_key: str
    version: int = 1  # >1 when the same SOP Instance UID arrives with different bytes
    calling_ae: str
    called_ae: str
    source_address: str | None = None
    association_id: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    station_name: str | None = None
    institution: str | None = None
    patient_pseudonym: str | None = None
    patient_sex: str | None = None
    age_band: str | None = None
    study_date: str | None = None
    accession_pseudonym: str | None = None
    pixel_spacing_mm: float | None = None  # in-plane PixelSpacing (row), for drift monitoring
    # --- receiver hardening (issues 14 and 18): the keywords (never the values) of text
    # attributes whose bytes are not valid in the character set the dataset declares
    # (PS3.5 section 6.1; no Specific Character Set = ASCII). Their text is not copied
    # into any event: a reader of the stored file must not trust it either.
    text_encoding_problems: tuple[str, ...] = ()
    # completion evidence (optional, added without a version change: older events lack it)
    #: ImagePositionPatient projected on the slice normal (ImageOrientationPatient), in mm
    slice_position_mm: float | None = None
    images_in_acquisition: int | None = None  # ImagesInAcquisition (0020,1002)
    declared_series_instances: int | None = None  # NumberOfSeriesRelatedInstances (0020,1209)
    declared_study_instances: int | None = None  # NumberOfStudyRelatedInstances (0020,1208)


class InstanceRejected(Event, frozen=True, kw_only=True, tag="ingest.instance.rejected"):
    """An instance was refused; the sender received ``status`` (a DICOM failure status)."""

    reason: str
    status: int
    status_name: str
    calling_ae: str
    called_ae: str
    source_address: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    # --- receiver hardening (issues 14 and 18): a stable code for the kind of refusal
    # (e.g. "identity_conflict", "too_large", "inflates_too_large"), and for an identity
    # conflict the study and series that hold the first object with this SOP Instance UID
    reason_code: str | None = None
    first_study_uid: str | None = None
    first_series_uid: str | None = None


class InstanceDuplicated(Event, frozen=True, kw_only=True, tag="ingest.instance.duplicated"):
    """Identical bytes of an instance already stored arrived again; nothing new was kept."""

    sop_instance_uid: str
    sha256: str
    calling_ae: str
    called_ae: str
    #: the association that re-sent it (a resend carries the study again: completion
    #: evidence); optional, added without a version change
    association_id: str | None = None


# --- receiver hardening (issues 14 and 18): refusals before any instance arrives ------


class ConnectionRefused(Event, frozen=True, kw_only=True, tag="ingest.connection.refused"):
    """The DICOM receiver refused or closed a connection before or while negotiating an
    association: the peer address, what it was refused for, never patient data.

    ``reason_code`` is one of ``address_not_allowed``, ``too_many_from_address``,
    ``too_many_pending``, ``no_association_request`` (nothing valid within the request
    timeout), ``request_pdu_too_large``, ``pdu_too_large``, ``malformed_request``
    (answered with an A-ASSOCIATE-RJ, PS3.8 section 9.3.4), ``too_many_associations``
    (A-ASSOCIATE-RJ local-limit-exceeded), ``message_too_large`` (a message outgrew the
    instance size limit while arriving) and ``tls_handshake_failed``. A burst from
    one address is folded: ``refused_count`` counts the refusals this event stands for
    (the first is recorded at once, the rest at most once per window).
    """

    source_address: str
    reason_code: str
    reason: str
    refused_count: int = 1
    calling_ae: str | None = None
    called_ae: str | None = None


class SeriesCompleted(Event, frozen=True, kw_only=True, tag="ingest.series.completed"):
    series_uid: str
    reason: CompletionReason
    instance_count: int
    modality: str | None = None
    series_description: str | None = None


class StudyCompleted(Event, frozen=True, kw_only=True, tag="ingest.study.completed"):
    """A study is complete for a pipeline, with the rule that decided it.

    v2 (current): ``reason`` is a ``CompletionReason`` (v1 wrote free strings such as
    "quiet" and "manifest") and ``latency_s`` (last instance → completion) was added.
    """

    SCHEMA_VERSION = 2

    reason: CompletionReason
    series_count: int
    instance_count: int
    latency_s: float
    first_instance_at: str | None = None  # ISO-8601 UTC
    last_instance_at: str | None = None
    series: tuple[SeriesSummary, ...] = ()
    patient_pseudonym: str | None = None
    # added without a version change (older events: not partial, no evidence recorded)
    #: completed on weak evidence (max wait with an aborted association, missing declared
    #: instances, a gap in a series): results of it are marked partial
    partial: bool = False
    #: what completion weighed, in our words (never a DICOM value), strongest first
    evidence: tuple[str, ...] = ()


class StudyAmended(Event, frozen=True, kw_only=True, tag="ingest.study.amended"):
    """Instances arrived after the study was declared complete (coalesced: one amendment
    per quiet round, decided by the same evidence as the completion)."""

    new_instance_count: int
    series_uids: tuple[str, ...]
    rerun: bool
    # added without a version change
    #: of the new instances, how many replace stored ones whose pixels changed
    pixels_changed: int = 0
    #: the pipeline marks its result stale instead of re-running (``on_changed_pixels``)
    stale: bool = False
    reason: CompletionReason | None = None
    instance_count: int | None = None  # the study's instances after this amendment
    partial: bool = False
    evidence: tuple[str, ...] = ()


class RouteMatched(Event, frozen=True, kw_only=True, tag="ingest.route.matched"):
    rule_ids: tuple[str, ...]
    pipelines: tuple[str, ...]
    called_ae: str
    reasons: tuple[str, ...] = ()
    series_uid: str | None = None  # routing is decided once per series


class RouteUnmatched(Event, frozen=True, kw_only=True, tag="ingest.route.unmatched"):
    called_ae: str
    reason: str
    series_uid: str | None = None


# ---------------------------------------------------------- ingest: associations (issue 15)
# Association facts are completion's evidence: every receiver process publishes them, and
# the completion detector reads them from the log (never a hint inside one process).
# Released and aborted are published once per study the association carried (so a
# study's audit shows them); an association that stored nothing gets one without a study.


class AssociationOpened(Event, frozen=True, kw_only=True, tag="ingest.association.opened"):
    """A DICOM association was accepted (PS3.8 A-ASSOCIATE).

    ``refused_contexts``: the presentation contexts the requestor proposed and we rejected
    in the A-ASSOCIATE-AC, each "SOP Class name: reason" (PS3.8 9.3.3.2 result/reason:
    abstract syntax not supported, transfer syntaxes not supported); empty when all were
    accepted. UIDs of SOP Classes and syntaxes are no patient data.
    """

    association_id: str
    calling_ae: str
    called_ae: str
    source_address: str | None = None  # the peer's IP address
    receiver: str | None = None  # which receiver process (host:pid)
    refused_contexts: tuple[str, ...] = ()


class AssociationReleased(Event, frozen=True, kw_only=True, tag="ingest.association.released"):
    """The peer released the association normally (A-RELEASE), after it carried
    ``instance_count`` distinct SOP Instances of ``study_uid`` (stored or duplicates)."""

    association_id: str
    calling_ae: str
    called_ae: str
    instance_count: int
    #: SHA-256 of the sorted SOP Instance UIDs it carried of this study, one per line
    sop_instances_sha256: str | None = None
    association_instance_count: int = 0  # all studies together
    duration_s: float | None = None


class AssociationAborted(Event, frozen=True, kw_only=True, tag="ingest.association.aborted"):
    """The association ended without a release: A-ABORT from the peer (``requestor``),
    from us (``acceptor``), or the connection was lost (``network``)."""

    association_id: str
    calling_ae: str
    called_ae: str
    aborted_by: str
    instance_count: int
    sop_instances_sha256: str | None = None
    association_instance_count: int = 0
    duration_s: float | None = None


# --------------------------------------------------------------------------- engine


class PipelineDeployed(Event, frozen=True, kw_only=True, tag="engine.pipeline.deployed"):
    name: str
    version: str
    file_sha256: str
    model_sha256: str | None = None
    stage: Stage = Stage.STAGING
    ae_title: str | None = None
    model_card: str | None = None
    reason: str | None = None
    # added without a version change (issue 16, live deployment): the deployed file's
    # own text and where it was read from, so every running worker can run it from the
    # log (relative model paths resolve against ``file_path``'s folder); older events
    # have neither and run only from a worker's pipeline folders
    file_text: str | None = None
    file_path: str | None = None
    # the pipeline file's ``targets.runtime_s`` (seconds); optional, added without a
    # version change (older deployments carry none: readers say "no target")
    runtime_target_s: float | None = None


class PipelineStageChanged(Event, frozen=True, kw_only=True, tag="engine.pipeline.stage_changed"):
    name: str
    version: str
    from_stage: Stage
    to_stage: Stage
    reason: str


class PipelineRetired(Event, frozen=True, kw_only=True, tag="engine.pipeline.retired"):
    name: str
    version: str
    reason: str


class InferenceRequested(Event, frozen=True, kw_only=True, tag="engine.inference.requested"):
    run_key: str  # (study, pipeline, model hash, file hash[, revision]): one result per key
    model_sha256: str | None = None
    stage: Stage | None = None
    trigger: str = "study_completed"


class InferenceStarted(Event, frozen=True, kw_only=True, tag="engine.inference.started"):
    run_key: str
    worker_id: str
    attempt: int = 1
    runtime: str | None = None


class OperatorFinished(Event, frozen=True, kw_only=True, tag="engine.operator.finished"):
    run_key: str
    operator: str
    index: int
    duration_s: float
    detail: str | None = None


class InferenceCompleted(Event, frozen=True, kw_only=True, tag="engine.inference.completed"):
    run_key: str
    model_name: str
    model_version: str
    model_sha256: str | None = None
    runtime: str
    runtime_reason: str
    duration_s: float
    inference_s: float
    selected_series: tuple[str, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    findings: tuple[Finding, ...] = ()
    score: float | None = None
    result_keys: tuple[str, ...] = ()
    progression: bool | None = None
    blinding_hash: str | None = None
    patient_pseudonym: str | None = None  # for longitudinal comparison (BTS)
    study_date: str | None = None  # YYYYMMDD, orders a patient's results


class InferenceSkipped(Event, frozen=True, kw_only=True, tag="engine.inference.skipped"):
    run_key: str
    reason: str
    rejected_series: tuple[str, ...] = ()


class InferenceFailed(Event, frozen=True, kw_only=True, tag="engine.inference.failed"):
    run_key: str
    operator: str
    error: str
    attempt: int
    final: bool


class ResultPublished(Event, frozen=True, kw_only=True, tag="engine.result.published"):
    run_key: str
    destination: str  # "pacs:ORTHANC", "xnat:https://…", "store"
    kind: str  # "SEG", "SR", "PNG"
    sop_instance_uid: str | None = None
    attempt: int = 1


class PublishFailed(Event, frozen=True, kw_only=True, tag="engine.result.publish_failed"):
    """A destination did not take a run's results: unreachable (``will_retry``), or,
    with ``refused``, one object refused for good by the destination itself."""

    run_key: str
    destination: str
    error: str
    attempt: int
    will_retry: bool
    #: where a retry from the log sends it: "AE@host:port" for a PACS (no credentials)
    address: str | None = None
    # --- refusals (issue 14): a PACS refused this one object; final, never retried
    refused: bool = False
    #: the DICOM status (PS3.4 B.2.3, e.g. 0x0122); None when no presentation context
    #: was accepted for its SOP class or the association was rejected permanently
    status: int | None = None
    sop_instance_uid: str | None = None
    kind: str | None = None  # "SEG" | "SR"


# ------------------------------------------------------ engine: superseded results (issue 15)


class ResultSuperseded(Event, frozen=True, kw_only=True, tag="engine.result.superseded"):
    """A re-run of the same study and pipeline replaced this result: read models, metrics
    and worklists count only the current one."""

    run_key: str  # the earlier result
    superseded_by: str  # the run key of the current result
    reason: str
    partial: bool = False  # the superseded result was from a partial study


class ResultMarkedStale(Event, frozen=True, kw_only=True, tag="engine.result.marked_stale"):
    """Pixels of the study changed under the same SOP Instance UIDs after this result,
    and the pipeline marks results stale instead of re-running (``on_changed_pixels``)."""

    run_key: str
    reason: str
    changed_instances: int


class ResultWithdrawn(Event, frozen=True, kw_only=True, tag="engine.result.withdrawn"):
    """A superseded result was withdrawn where it had been published: from a PACS by an
    IHE IOCM rejection note (a Key Object Selection Document titled with the rejection
    reason), from an XNAT case by removing its files."""

    run_key: str  # the superseded result
    destination: str  # "pacs:AE" or "xnat:URL"
    rejected_sop_instance_uids: tuple[str, ...]
    reason_code: str  # e.g. "(113001, DCM, Rejected for Quality Reasons)"
    rejection_note_uid: str | None = None  # the KOS SOP Instance UID (PACS)


# ------------------------------------------------ engine: live deployment, re-runs (issue 16)


class NotRunReason(StrEnum):
    """Why a completed study has no runnable pipeline (``StudyNotRun.reason_code``)."""

    NOT_DEPLOYED = "not_deployed"  # no deployment of that name in the log
    RETIRED = "retired"
    #: deployed, but no worker can read the deployed file (no text in the log and no
    #: file of that hash in its folders, or its model is missing or altered there)
    FILE_UNAVAILABLE = "file_unavailable"


class StudyNotRun(Event, frozen=True, kw_only=True, tag="engine.study.not_run"):
    """A study completed (or was asked to re-run) for ``pipeline`` and no runnable
    pipeline of that name exists: nothing ran, and this says why (our words, no DICOM
    value). A later completion or re-run after a deployment runs it."""

    reason_code: NotRunReason
    reason: str
    trigger: str  # the trigger's type name, e.g. "ingest.study.completed"


class SeriesChoice(msgspec.Struct, frozen=True, kw_only=True):
    """One series a run considered: chosen or not, and why (our words, attribute
    keywords and the pipeline file's own operands; never a DICOM value)."""

    series_uid: str
    chosen: bool
    reason: str


class SeriesSelected(Event, frozen=True, kw_only=True, tag="engine.series.selected"):
    """Series selection of one run attempt: every series of the study it considered,
    with the reason each was chosen or rejected. Recorded for failed runs too, so the
    audit names the series a failure used."""

    run_key: str
    attempt: int
    series: tuple[SeriesChoice, ...]


class StudyRerunRequested(Event, frozen=True, kw_only=True,
                          tag="engine.study.rerun_requested"):
    """Someone asked for a study to be run again by ``pipeline`` (``lastmile study
    rerun``): the actor says who, ``why`` says why. The run's key includes this event's
    id, so it is a new result; it supersedes the earlier ones (``ResultSuperseded``)."""

    why: str
    #: the deployed file's SHA-256 when it was asked (None: the pipeline was not deployed)
    file_sha256: str | None = None


class MeasurementRecomputed(
    Event, frozen=True, kw_only=True, tag="engine.measurement.recomputed"
):
    """After a clinician's edit: volumes recomputed, Dice against the AI mask."""

    run_key: str
    edit_event_id: str
    measurements: tuple[Measurement, ...]
    dice: dict[str, float] = {}


# --------------------------------------------------------------------------- review


class QcPassed(Event, frozen=True, kw_only=True, tag="review.qc.passed"):
    run_key: str
    seconds_on_case: float | None = None
    comment: str | None = None


class QcRejected(Event, frozen=True, kw_only=True, tag="review.qc.rejected"):
    run_key: str
    reason: str
    seconds_on_case: float | None = None


class CaseAssigned(Event, frozen=True, kw_only=True, tag="review.case.assigned"):
    run_key: str
    reader: str
    blinded_label: str | None = None  # salted hash shown to the reader (LTS)


class ReviewSubmitted(Event, frozen=True, kw_only=True, tag="review.review.submitted"):
    """A reader's verdict on an AI result, and their own read where the form asks for it."""

    run_key: str
    reader: str
    agree: dict[str, bool] = {}  # per finding label
    reads: dict[str, str] = {}  # reader's own classification per label
    confidence: int | None = None  # 1..5
    comment: str | None = None
    seconds_on_case: float | None = None
    blinded_label: str | None = None
    source: str = "lastmile"  # or "xnat"


class EditSubmitted(Event, frozen=True, kw_only=True, tag="review.edit.submitted"):
    run_key: str
    reader: str
    store_key: str  # the corrected SEG in the instance store
    sha256: str
    source: str = "lastmile"


# --------------------------------------------------------------------------- review: sign-in
# Who signed in to the pages, who failed to, who signed out, and which cases a reader
# opened (issue 18, the pages). The authenticating front (``dashboards.front``) records the
# sign-in facts; the case page records ``CaseViewed``. A password never appears, and a name
# that is not a user is never recorded (people type passwords into the name field): such an
# attempt has ``user = None``. ``address`` is the client's IP address as the front saw it.


class SigninFailure(StrEnum):
    """Why a sign-in was refused."""

    WRONG_PASSWORD = "wrong_password"
    UNKNOWN_USER = "unknown_user"
    DISABLED = "disabled"
    USER_LIMITED = "user_limited"  # too many failures for this user name: locked for a while
    ADDRESS_LIMITED = "address_limited"  # too many failures from this address


class SessionEnd(StrEnum):
    """Why a pages session ended before its idle timeout."""

    SIGNED_OUT = "signed_out"
    PASSWORD_CHANGED = "password_changed"


class SigninSucceeded(Event, frozen=True, kw_only=True, tag="review.signin.succeeded"):
    user: str
    address: str
    method: str = "password"  # or "proxy": the site's trusted sign-in proxy named the user


class SigninFailed(Event, frozen=True, kw_only=True, tag="review.signin.failed"):
    user: str | None  # None: the name given is not a user (never recorded)
    address: str
    reason: SigninFailure
    failures: int = 1  # failures in the current window (per user, or per address when limited)
    retry_after_s: float | None = None  # when limited: how long sign-in stays refused


class SessionEnded(Event, frozen=True, kw_only=True, tag="review.session.ended"):
    user: str
    address: str
    reason: SessionEnd
    sessions: int = 1  # how many of the user's sessions this ended


class PasswordChanged(Event, frozen=True, kw_only=True, tag="review.password.changed"):
    user: str
    address: str


class CaseViewed(Event, frozen=True, kw_only=True, tag="review.case.viewed"):
    """A reader (or QC reviewer) opened a case: once per run per page session."""

    run_key: str
    reader: str
    page: str = "case"  # or "qc", "blinded"


# --------------------------------------------------------------------------- projections


class DriftAlertRaised(Event, frozen=True, kw_only=True, tag="projections.drift.alert_raised"):
    feature: str
    psi: float
    threshold: float
    window_start: str
    window_end: str
    baseline_start: str
    baseline_end: str


# --------------------------------------------------------------------------- system


class DeliveryFailed(Event, frozen=True, kw_only=True, tag="system.delivery.failed"):
    """Dead letter: a message that could not be handled, and why.

    The original stays in the stream at ``stream_sequence``; only its hash and
    size are copied here, so a malformed message can never carry patient data
    into a second place.
    """

    consumer: str
    subject: str
    stream_sequence: int
    deliveries: int
    reason: str
    original_type: str | None = None
    original_event_id: str | None = None
    payload_sha256: str | None = None
    payload_size: int | None = None


# --------------------------------------------------------------------------- access and the log
# (issue 18: who proved who they are on the command line, who changed the users, what was
# redacted from the log.) The CLI (NATS role admin) publishes them; the pages' own sign-in
# and case-view facts are ``review.*`` events. None carries a password or any DICOM
# value: a failed sign-in names the user only when that name exists.


class SignedIn(Event, frozen=True, kw_only=True, tag="access.sign_in.succeeded"):
    """A person proved who they are to a command (``actor`` is then ``user:<name>``)."""

    user: str
    channel: str  # "cli"
    method: str  # "password"
    source_address: str | None = None


class SignInFailed(Event, frozen=True, kw_only=True, tag="access.sign_in.failed"):
    """A refused sign-in. ``user`` is set only for a name in the users file (a mistyped
    password in the name field must not be logged); ``reason`` is our words."""

    channel: str
    reason: str  # "wrong password", "unknown user", "the governance or admin role is needed"
    user: str | None = None
    source_address: str | None = None


class UserChanged(Event, frozen=True, kw_only=True, tag="access.user.changed"):
    """Who may sign in changed (``lastmile users ...``); ``actor`` is who changed it."""

    user: str
    change: str  # "added" | "updated" | "removed" | "disabled"
    roles: tuple[str, ...] = ()
    pipelines: tuple[str, ...] = ()


class LogRedacted(Event, frozen=True, kw_only=True, tag="system.log.redacted"):
    """Messages were erased from the log (``lastmile redact``) because they held a value
    that must not be there. Records which messages, never the value itself."""

    sequences: tuple[int, ...]
    types: tuple[str, ...]  # each erased message's event type, in ``sequences`` order
    event_ids: tuple[str, ...] = ()
    reason: str
    read_models_rebuilt: bool = False


# --------------------------------------------------------------------------- priors from
# the PACS (issue 16, item 7): a longitudinal pipeline asks the PACS for the patient's
# earlier studies when the log holds no earlier result (engine.pacs_priors). No DICOM
# value here: study UIDs, dates (as InstanceStored records them), AE titles and counts.


class PriorOutcome(StrEnum):
    """What asking the PACS for earlier studies gave."""

    FOUND = "found"  # it holds earlier studies of the patient (``prior_study_uids``)
    NONE = "none"  # it holds none, or the study cannot be asked about: final
    FAILED = "failed"  # it could not be asked: infrastructure, retried with a bound


class RetrieveOutcome(StrEnum):
    """What became of one earlier study chosen for the comparison."""

    RETRIEVED = "retrieved"  # the PACS sent it to our receiver (C-MOVE)
    IN_LOG = "in_log"  # its instances were already in the log: nothing to fetch
    FAILED = "failed"  # the PACS did not send it (wholly): retried with a bound


class PriorsSearched(Event, frozen=True, kw_only=True, tag="engine.priors.searched"):
    """The PACS was asked (C-FIND, Study Root, STUDY level; PS3.4 C.6.2) for the
    patient's studies of ``modality`` dated before ``before_date`` (the current study's
    date), because the log held no earlier result of the pipeline. Recorded on the
    current study; with ``NONE`` (final) the run proceeds without change figures."""

    run_key: str
    address: str  # the PACS, AE@host:port
    outcome: PriorOutcome
    modality: str | None = None
    before_date: str | None = None  # YYYYMMDD
    prior_study_uids: tuple[str, ...] = ()  # every earlier study found, earliest first
    chosen_study_uids: tuple[str, ...] = ()  # those compared with: baseline, latest
    reason: str = ""  # our words and attribute keywords, never a value
    attempt: int = 1  # the worker's delivery attempt
    final: bool = True  # False: the run fails now and is retried (``FAILED`` only)


class PriorRetrieved(Event, frozen=True, kw_only=True, tag="engine.prior.retrieved"):
    """One earlier study chosen by ``PriorsSearched`` was sent by the PACS to our
    receiver (C-MOVE, PS3.4 C.4.2), was already in the log, or was not sent. Recorded
    on the *earlier* study (its audit says where it came from and for which study); its
    instances are ``instance stored`` events of the receiver, as for any sender. The
    pipeline then runs on it (this event is that run's trigger) so the current run can
    compare with its result."""

    for_study_uid: str  # the current study that needed it
    for_run_key: str
    address: str  # the PACS, AE@host:port
    move_destination: str  # the AE title the PACS sent it to
    outcome: RetrieveOutcome
    study_date: str | None = None  # YYYYMMDD, as the PACS answered it
    completed: int = 0  # C-MOVE sub-operations (PS3.4 C.4.2.1.4)
    failed: int = 0
    warning: int = 0
    reason: str = ""
    attempt: int = 1


ALL_EVENT_TYPES: tuple[type[Event], ...] = (
    InstanceStored,
    InstanceRejected,
    InstanceDuplicated,
    ConnectionRefused,  # receiver hardening (issues 14 and 18)
    SeriesCompleted,
    StudyCompleted,
    StudyAmended,
    RouteMatched,
    RouteUnmatched,
    AssociationOpened,
    AssociationReleased,
    AssociationAborted,
    PipelineDeployed,
    PipelineStageChanged,
    PipelineRetired,
    InferenceRequested,
    InferenceStarted,
    OperatorFinished,
    InferenceCompleted,
    InferenceSkipped,
    InferenceFailed,
    ResultPublished,
    PublishFailed,
    ResultSuperseded,
    ResultMarkedStale,
    ResultWithdrawn,
    StudyNotRun,
    StudyRerunRequested,
    SeriesSelected,
    MeasurementRecomputed,
    QcPassed,
    QcRejected,
    CaseAssigned,
    ReviewSubmitted,
    EditSubmitted,
    # review: sign-in (issue 18)
    SigninSucceeded,
    SigninFailed,
    SessionEnded,
    PasswordChanged,
    CaseViewed,
    DriftAlertRaised,
    DeliveryFailed,
    SignedIn,
    SignInFailed,
    UserChanged,
    LogRedacted,
    PriorsSearched,  # priors from the PACS (issue 16, item 7)
    PriorRetrieved,
)
