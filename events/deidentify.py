"""De-identification of the event log for exports (PS3.15 Annex E, applied to events).

One keyed mapping serves every file of an export — the events, the label tables and the
de-identified DICOM of a retraining set — so that joins inside an export still work and
nothing in it matches the site's own records:

- **UIDs** (study, series, SOP instance, frame of reference…) become ``2.25.<n>`` UIDs
  (PS3.5 B.2) computed by HMAC-SHA256 under the export key. UIDs of the DICOM registry
  (SOP Classes, Transfer Syntaxes, coding schemes: PS3.6 Annex A, as pydicom's UID
  dictionary holds it) are *kept*, so an export still says what each object is.
- **Ids** that would match the site's log (event ids, causation ids, correlation ids,
  run keys, association ids, blinded labels) are remapped by HMAC, the same id to the
  same new id, so causality and joins survive; stream sequence numbers become the
  position in the export.
- **People** (patients, readers, AE titles and workers acting): a patient's site
  pseudonym becomes an export pseudonym ``P-<16 hex>``, every actor or reader
  ``U-<12 hex>``.
- **Dates and times** shift by a whole number of days per patient (PS3.15 E.3.6 Retain
  Longitudinal Temporal Information with Modified Dates): intervals within a patient and
  the time of day are exact; events without a patient shift by a site-wide offset.
- **Removed**: institution, station, source addresses, AE titles, file hashes and store
  paths (they identify the site's files), patient sex and age band (PS3.15 keeps them
  only under the Retain Patient Characteristics option, which this export does not
  claim), free-text comments, and the NATS subject of a dead letter (it hashes the
  study UID).
- **Free text** kept for its meaning (reasons, errors, operator details, series
  descriptions: PS3.15 E.3.5 Clean Descriptors) is cleaned: every UID in it remapped,
  absolute paths, 64-hex digests and every known identifying value (AE titles,
  addresses, institutions, stations, people's names) replaced by a placeholder.

Every field of every event type has exactly one action in ``FIELD_ACTIONS``; a test
checks that the catalogue has none without, so a new field forces a decision.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any

from events.base import Event
from events.codec import to_builtins

#: Days by which a patient's dates move back: between one and three years, whole days.
MIN_SHIFT_DAYS, MAX_SHIFT_DAYS = 365, 3 * 365
SITE = "\x00site"  # the shift key of events that belong to no patient


class Action(StrEnum):
    """What the export does with one field (PS3.15 Table E.1-1a's action codes in
    spirit: K keep, U remap, X remove, C clean)."""

    KEEP = "keep"
    UID = "uid"  # remap a UID (registry UIDs kept)
    ID = "id"  # remap an opaque id (event, correlation, run key...)
    EVENT_ID = "event_id"
    PATIENT = "patient"  # site pseudonym -> export pseudonym
    PERSON = "person"  # reader, actor, worker -> export pseudonym
    DATE = "date"  # YYYYMMDD, shifted per patient
    DATETIME = "datetime"  # ISO-8601 or datetime, shifted per patient
    TEXT = "text"  # free text kept for meaning, cleaned
    RESULT_KEY = "result_key"  # relative store path: UIDs in it remapped
    DESTINATION = "destination"  # "pacs:AE" -> "pacs"
    REMOVE = "remove"
    NESTED = "nested"  # a struct or list of structs: its own fields' actions apply


#: One action per field name, for every event type and nested struct of the catalogue.
FIELD_ACTIONS: Mapping[str, Action] = {
    # envelope
    "type": Action.KEEP, "schema_version": Action.KEEP, "pipeline": Action.KEEP,
    "event_id": Action.EVENT_ID, "causation_id": Action.EVENT_ID,
    "correlation_id": Action.ID, "occurred_at": Action.DATETIME,
    "recorded_at": Action.DATETIME, "actor": Action.PERSON, "study_uid": Action.UID,
    # DICOM identity
    "sop_instance_uid": Action.UID, "sop_class_uid": Action.UID, "series_uid": Action.UID,
    "transfer_syntax_uid": Action.UID, "series_uids": Action.UID,
    "selected_series": Action.UID, "rejected_series": Action.UID,
    # the site's files, places and network
    "sha256": Action.REMOVE, "store_key": Action.REMOVE, "payload_sha256": Action.REMOVE,
    "calling_ae": Action.REMOVE, "called_ae": Action.REMOVE, "ae_title": Action.REMOVE,
    "source_address": Action.REMOVE, "address": Action.REMOVE, "subject": Action.REMOVE,
    "institution": Action.REMOVE, "station_name": Action.REMOVE,
    "association_id": Action.ID, "result_keys": Action.RESULT_KEY,
    "destination": Action.DESTINATION,
    # people
    "patient_pseudonym": Action.PATIENT, "accession_pseudonym": Action.ID,
    "reader": Action.PERSON, "worker_id": Action.PERSON,
    "patient_sex": Action.REMOVE, "age_band": Action.REMOVE, "comment": Action.REMOVE,
    # dates
    "study_date": Action.DATE, "first_instance_at": Action.DATETIME,
    "last_instance_at": Action.DATETIME, "window_start": Action.DATETIME,
    "window_end": Action.DATETIME, "baseline_start": Action.DATETIME,
    "baseline_end": Action.DATETIME,
    # ids that join the site's log
    "run_key": Action.ID, "edit_event_id": Action.EVENT_ID,
    "original_event_id": Action.EVENT_ID, "blinding_hash": Action.ID,
    "blinded_label": Action.ID,
    # free text, cleaned
    "reason": Action.TEXT, "reasons": Action.TEXT, "error": Action.TEXT,
    "detail": Action.TEXT, "runtime_reason": Action.TEXT,
    "series_description": Action.TEXT, "model_card": Action.TEXT,
    # association facts, completion evidence, superseded results (issue 15)
    "receiver": Action.REMOVE, "sop_instances_sha256": Action.REMOVE,
    "superseded_by": Action.ID, "rejection_note_uid": Action.UID,
    "rejected_sop_instance_uids": Action.UID, "evidence": Action.TEXT,
    # receiver refusals (issue 14, 18); refused presentation contexts are SOP Class names
    "first_series_uid": Action.UID, "first_study_uid": Action.UID,
    "refused_contexts": Action.KEEP,
    # live deployment, re-runs, runtime targets (issues 16, 19): the deployed file's text
    # and path may name the site's folders (its SHA-256 stays); a re-run's reason is text
    "file_text": Action.REMOVE, "file_path": Action.REMOVE, "why": Action.TEXT,
    "runtime_target_s": Action.KEEP,
    # sign-ins, users, redaction (issue 18): the person is a person, the rest is facts
    "user": Action.PERSON, "event_ids": Action.EVENT_ID,
    # priors from the PACS (issue 16, item 7); the PACS's address is removed as "address"
    "before_date": Action.DATE, "prior_study_uids": Action.UID,
    "chosen_study_uids": Action.UID, "for_study_uid": Action.UID,
    "for_run_key": Action.ID, "move_destination": Action.REMOVE, "outcome": Action.KEEP,
    "completed": Action.KEEP, "failed": Action.KEEP, "warning": Action.KEEP,
    # nested structs
    "series": Action.NESTED, "measurements": Action.NESTED, "findings": Action.NESTED,
    # facts without identity
    **{k: Action.KEEP for k in (
        "size_bytes", "version", "modality", "series_number", "instance_number",
        "manufacturer", "manufacturer_model", "pixel_spacing_mm", "status", "status_name",
        "instance_count", "series_count", "latency_s", "new_instance_count", "rerun",
        "rule_ids", "pipelines", "name", "file_sha256", "model_sha256", "stage",
        "from_stage", "to_stage", "trigger", "attempt", "runtime", "operator", "index",
        "duration_s", "model_name", "model_version", "inference_s", "score",
        "progression", "final", "kind", "will_retry", "dice", "seconds_on_case",
        "agree", "reads", "confidence", "source", "feature", "psi", "threshold",
        "consumer", "stream_sequence", "deliveries", "original_type", "payload_size",
        "value", "unit", "label", "classification", "probability", "box",
        "aborted_by", "association_instance_count", "change", "changed_instances",
        "channel", "declared_series_instances", "declared_study_instances", "failures",
        "images_in_acquisition", "method", "page", "partial", "pixels_changed",
        "read_models_rebuilt", "reason_code", "refused", "refused_count", "retry_after_s",
        "roles", "sequences", "sessions", "slice_position_mm", "stale",
        "text_encoding_problems", "types")},
}

# a UID (three components or more, e.g. 2.25.<n>) standing alone, "seg-<uid>.dcm" too
_UID_IN_TEXT = re.compile(r"(?<![\w.])[0-2](?:\.(?:0|[1-9]\d*)){2,}(?!\.?\d)")
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")
_DIGEST = re.compile(r"\b[0-9a-f]{64}\b")
_RUN_KEY = re.compile(r"[0-9a-f]{32}")
_UID_SYNTAX = re.compile(r"[0-2](?:\.(?:0|[1-9]\d*))+")


def is_standard_uid(value: str) -> bool:
    """True for a UID of the DICOM registry (PS3.6 Annex A: SOP Classes, Transfer
    Syntaxes, coding schemes, well-known instances), as pydicom's UID dictionary has it."""
    if not _UID_SYNTAX.fullmatch(value):
        return False
    from pydicom.uid import UID

    return UID(value).name != value


def _shift_iso(text: str, days: int) -> str:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return "" if _looks_dated(text) else text
    return (parsed + timedelta(days=days)).isoformat()


def _looks_dated(text: str) -> bool:
    return bool(re.search(r"\d{4}-?\d{2}-?\d{2}", text))


@dataclass
class Pseudonymiser:
    """The keyed mappings (HMAC-SHA256 under ``key``); same key, same output, always."""

    key: bytes

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\x1f{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """A ``2.25`` UID for ``value``; a registry UID is returned unchanged."""
        value = value.strip()
        if not value or is_standard_uid(value):
            return value
        return "2.25." + str(uuid.UUID(bytes=self._digest("uid", value)[:16]).int)

    def ident(self, value: str, kind: str = "id") -> str:
        return str(uuid.UUID(bytes=self._digest(kind, value)[:16]))

    def patient(self, site_pseudonym: str) -> str:
        return "P-" + self._digest("patient", site_pseudonym)[:8].hex()

    def person(self, name: str) -> str:
        return "U-" + self._digest("person", name)[:6].hex()

    def shift_days(self, patient_key: str) -> int:
        """Days (negative) by which this patient's dates move; the same per key."""
        n = int.from_bytes(self._digest("shift", patient_key)[:4], "big")
        return -(MIN_SHIFT_DAYS + n % (MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1))

    def shift_date(self, yyyymmdd: str, days: int) -> str:
        try:
            d = date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
        except ValueError:
            return ""
        return (d + timedelta(days=days)).strftime("%Y%m%d") + yyyymmdd[8:]


@dataclass
class LogContext:
    """What a first pass over the events to export learns: whose study is whose (for the
    per-patient shift), every identifying value to clean out of free text, and each
    event's position in the export."""

    study_patient: dict[str, str] = field(default_factory=dict)
    known_values: set[str] = field(default_factory=set)
    positions: dict[int, int] = field(default_factory=dict)

    def learn(self, sequence: int, event: Event) -> None:
        self.positions.setdefault(sequence, len(self.positions) + 1)
        data = to_builtins(event)
        patient = data.get("patient_pseudonym")
        if patient and event.study_uid:
            self.study_patient.setdefault(event.study_uid, patient)
        for key in ("calling_ae", "called_ae", "ae_title", "source_address", "institution",
                    "station_name", "address", "reader", "worker_id", "actor",
                    "blinding_hash", "blinded_label"):  # LTS SEGs carry the label in text
            value = data.get(key)
            if isinstance(value, str) and len(value.strip()) >= 3:
                self.known_values.add(value.strip())
        dest = data.get("destination")
        if isinstance(dest, str) and ":" in dest:
            self.known_values.add(dest.split(":", 1)[1])

    @classmethod
    def of(cls, events: Iterable[tuple[int, Event]]) -> LogContext:
        ctx = cls()
        for seq, ev in events:
            ctx.learn(seq, ev)
        return ctx


class Deidentifier:
    """Applies ``FIELD_ACTIONS`` to events with one ``Pseudonymiser`` and a
    ``LogContext``; counts what it removed or changed (for the export's manifest)."""

    def __init__(self, pseudo: Pseudonymiser, context: LogContext | None = None) -> None:
        self.pseudo = pseudo
        self.context = context or LogContext()
        self.removed: Counter[str] = Counter()
        self.changed: Counter[str] = Counter()
        self._known_re: re.Pattern[str] | None = None

    # ------------------------------------------------------------------ values

    def shift_for_study(self, study_uid: str | None) -> int:
        patient = self.context.study_patient.get(study_uid or "")
        return self.pseudo.shift_days(patient or study_uid or SITE)

    def patient_for_study(self, study_uid: str) -> str | None:
        patient = self.context.study_patient.get(study_uid)
        return self.pseudo.patient(patient) if patient else None

    def sequence(self, sequence: int) -> int:
        return self.context.positions.get(sequence, sequence)

    def timestamp(self, value: datetime, study_uid: str | None) -> datetime:
        return value + timedelta(days=self.shift_for_study(study_uid))

    def clean_text(self, text: str) -> str:
        """Free text with UIDs remapped and paths, digests and known values replaced."""
        text = _UID_IN_TEXT.sub(lambda m: self.pseudo.uid(m.group(0)) if len(m.group(0)) >= 10
                                else m.group(0), text)  # "1.0.0" is a version
        text = _ABS_PATH.sub("<path>", text)
        text = _DIGEST.sub("<sha256>", text)
        known = self._known()
        return known.sub("<removed>", text) if known is not None else text

    def _known(self) -> re.Pattern[str] | None:
        if self._known_re is None and self.context.known_values:
            alts = sorted(self.context.known_values, key=len, reverse=True)
            self._known_re = re.compile("|".join(re.escape(v) for v in alts))
        return self._known_re

    def result_key(self, key: str) -> str:
        parts = [p for p in key.replace("\\", "/").split("/") if p]
        out = []
        for part in parts:
            if _RUN_KEY.fullmatch(part):  # results/<run key>/...: the run key as run_key
                out.append(self.pseudo.ident(part))
                continue
            stem, dot, ext = part.partition(".dcm") if part.endswith(".dcm") else (part, "", "")
            out.append(self.clean_text(stem) + dot + ext)
        return "/".join(out)

    # ------------------------------------------------------------------ events

    def event(self, event: Event) -> dict[str, Any]:
        """The event as builtins (JSON-ready), de-identified field by field."""
        data = to_builtins(event)
        days = self.shift_for_study(event.study_uid)
        return self._struct(data, days)

    def _struct(self, data: Mapping[str, Any], days: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            action = FIELD_ACTIONS.get(key)
            if action is None:  # unknown field (a newer event): remove rather than leak
                action = Action.REMOVE
            if action is Action.REMOVE:
                if value not in (None, "", [], {}):
                    self.removed[key] += 1
                continue
            new = self._apply(action, value, days)
            if new != value:
                self.changed[key] += 1
            out[key] = new
        return out

    def _apply(self, action: Action, value: Any, days: int) -> Any:
        if value is None or action is Action.KEEP:
            return value
        if isinstance(value, list | tuple) and action is not Action.NESTED:
            return [self._apply(action, v, days) for v in value]
        p = self.pseudo
        match action:
            case Action.UID:
                return p.uid(value)
            case Action.ID:
                return p.ident(value)
            case Action.EVENT_ID:
                return p.ident(value, "event")
            case Action.PATIENT:
                return p.patient(value)
            case Action.PERSON:
                return p.person(value)
            case Action.DATE:
                return p.shift_date(value, days)
            case Action.DATETIME:
                return _shift_iso(value, days)
            case Action.TEXT:
                return self.clean_text(value)
            case Action.RESULT_KEY:
                return self.result_key(value)
            case Action.DESTINATION:
                return value.split(":", 1)[0]
            case Action.NESTED:
                items = value if isinstance(value, list | tuple) else [value]
                return [self._struct(v, days) if isinstance(v, Mapping) else v for v in items]
        raise AssertionError(action)

    def manifest(self) -> dict[str, Any]:
        """What was removed and what was remapped, by field, with the rules applied."""
        return {
            "removed_fields": dict(sorted(self.removed.items())),
            "changed_fields": dict(sorted(self.changed.items())),
            "actions": {k: str(v) for k, v in sorted(FIELD_ACTIONS.items())},
            "date_shift": f"whole days, {MIN_SHIFT_DAYS}-{MAX_SHIFT_DAYS} back, per patient "
                          "(keyed); events of no patient by one site-wide offset",
        }


def export_key(site_secret: bytes) -> bytes:
    """The key of every export of a site: derived from (never equal to) the site secret,
    so export pseudonyms differ from the site's own and two exports agree."""
    return hmac.new(site_secret, b"lastmile export v1", hashlib.sha256).digest()
