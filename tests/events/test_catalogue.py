"""The catalogue: unique names and subjects, codec round trips, golden fixtures, upcasting."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from events import CodecError, decode, encode
from events.base import Event, deterministic_id
from events.catalogue import (
    ALL_EVENT_TYPES,
    CompletionReason,
    InstanceStored,
    StudyCompleted,
)
from events.codec import HDR_MSG_ID, REGISTRY, _build_registry
from events.subjects import study_filter, subject_for, type_filter

from .samples import all_samples, sample_event

FIXTURES = Path(__file__).parent.parent / "fixtures" / "events"


def test_every_type_name_is_unique_and_dotted() -> None:
    names = [cls.type_name() for cls in ALL_EVENT_TYPES]
    assert len(names) == len(set(names))
    assert all(n.count(".") >= 2 and n == n.lower() for n in names)
    assert set(REGISTRY) == set(names)


def test_registry_refuses_a_type_name_used_twice() -> None:
    class Clash(Event, frozen=True, kw_only=True, tag="ingest.instance.stored"):
        pass

    with pytest.raises(ValueError, match="ingest.instance.stored"):
        _build_registry((*ALL_EVENT_TYPES, Clash))


def test_every_subject_is_unique_per_type_and_study() -> None:
    studies = ["1.2.3", "1.2.4", None]
    subjects = [subject_for(cls.type_name(), s) for cls in ALL_EVENT_TYPES for s in studies]
    assert len(subjects) == len(set(subjects))


def test_subjects_filter_one_study_and_one_type() -> None:
    a = subject_for("ingest.instance.stored", "1.2.840.1")
    b = subject_for("ingest.instance.stored", "1.2.840.2")
    assert a.startswith(study_filter("1.2.840.1")[:-1])
    assert not b.startswith(study_filter("1.2.840.1")[:-1])
    prefix, star, rest = type_filter("ingest.instance.stored").partition("*")
    assert a.startswith(prefix) and a.endswith(rest) and star == "*"


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_name())
def test_codec_round_trip_with_headers(event: Event) -> None:
    subject, body, headers = encode(event)
    assert headers == {HDR_MSG_ID: event.event_id}
    assert subject.endswith("." + event.type_name())
    assert decode(body, headers) == event
    assert decode(body) == event  # without headers the body says its type


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_name())
def test_events_are_immutable(event: Event) -> None:
    with pytest.raises(AttributeError):
        event.actor = "someone else"  # type: ignore[misc]


def test_every_type_has_a_golden_fixture_of_its_current_version() -> None:
    for cls in ALL_EVENT_TYPES:
        path = FIXTURES / cls.type_name() / f"v{cls.SCHEMA_VERSION}.json"
        assert path.exists(), f"add a golden fixture {path} when changing {cls.__name__}"


def _fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*/v*.json"))


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_fixtures_still_decode(path: Path) -> None:
    """Every stored version of every type reads back through today's class; for the
    current version, nothing stored is lost or changed (new optional fields may appear)."""
    raw = json.loads(path.read_text())
    event = decode(path.read_bytes())
    assert event.type_name() == path.parent.name
    assert event.schema_version == type(event).SCHEMA_VERSION
    if int(path.stem[1:]) == type(event).SCHEMA_VERSION:
        again = json.loads(msgspec.json.encode(msgspec.structs.replace(event)))
        full = {**json.loads(_with_defaults(event)), **again}
        for key, value in raw.items():
            assert full[key] == value, f"{path}: field {key} changed"


def _with_defaults(event: Event) -> bytes:
    """Encode including fields at their default (the wire format omits them)."""
    return msgspec.json.encode({f: getattr(event, f) for f in event.__struct_fields__})


def test_instance_stored_v1_is_upcast() -> None:
    event = decode((FIXTURES / "ingest.instance.stored" / "v1.json").read_bytes())
    assert isinstance(event, InstanceStored)
    assert event.size_bytes == 3
    assert event.store_key == "9a/3f/9a3f00c0ffee.dcm"
    assert event.patient_sex is None and event.age_band is None


def test_study_completed_v1_is_upcast() -> None:
    event = decode((FIXTURES / "ingest.study.completed" / "v1.json").read_bytes())
    assert isinstance(event, StudyCompleted)
    assert event.reason is CompletionReason.EXPECTED_SERIES
    assert event.latency_s == -1.0


@pytest.mark.parametrize(
    ("body", "headers", "why"),
    [
        (b"\x00\x01 not json", None, "not a Lastmile event"),
        (b'{"hello": 1}', None, "not a Lastmile event"),
        (b'{"type": "ingest.nope", "schema_version": 1}', None, "unknown event type"),
        (b'{"type": "ingest.route.unmatched", "schema_version": 1}', None, "invalid"),
        (b'{"type": "ingest.route.unmatched", "schema_version": 1, "event_id": 5}', None,
         "invalid"),
        (b'{"type": "ingest.route.unmatched", "schema_version": 99}', None, "newer Lastmile"),
    ],
)
def test_bad_messages_raise_codec_error_with_reason(
    body: bytes, headers: dict[str, str] | None, why: str
) -> None:
    with pytest.raises(CodecError, match=why):
        decode(body, headers)


def test_deterministic_ids_are_stable_and_distinct() -> None:
    assert deterministic_id("a", 1) == deterministic_id("a", 1)
    assert deterministic_id("a", 1) != deterministic_id("a", 2)
    assert deterministic_id("ab", "c") != deterministic_id("a", "bc")


def test_new_fills_envelope_and_correlates_a_study() -> None:
    a = sample_event(StudyCompleted)
    first = type(a).new(actor="t", study_uid="1.2.3", reason=CompletionReason.FORCED,
                        series_count=1, instance_count=1, latency_s=0.0)
    second = first.caused(StudyCompleted, actor="u", reason=CompletionReason.FORCED,
                          series_count=1, instance_count=1, latency_s=0.0)
    assert first.correlation_id == second.correlation_id
    assert second.causation_id == first.event_id and second.study_uid == "1.2.3"
    assert first.occurred_at.tzinfo is not None and first.schema_version == 2
