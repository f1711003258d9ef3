"""The export's de-identification of events (pure): one action per field, registry UIDs
kept, per-patient date shifts, cleaned free text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from events.catalogue import (
    ALL_EVENT_TYPES,
    Finding,
    InferenceCompleted,
    InstanceStored,
    Measurement,
    OperatorFinished,
    PipelineDeployed,
    PublishFailed,
    SeriesSummary,
    StudyCompleted,
)
from events.deidentify import (
    FIELD_ACTIONS,
    MAX_SHIFT_DAYS,
    MIN_SHIFT_DAYS,
    Action,
    Deidentifier,
    LogContext,
    Pseudonymiser,
    export_key,
    is_standard_uid,
)
from events.export import event_row

KEY = b"x" * 32
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY_A1, STUDY_A2, STUDY_B = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12", \
    "1.2.826.0.1.3680043.8.498.13"


def _fields(cls: type) -> set[str]:
    return {f.name for f in msgspec.structs.fields(cls)}


def test_every_field_of_the_catalogue_has_one_action() -> None:
    names = set().union(*(_fields(t) for t in ALL_EVENT_TYPES),
                        *(_fields(t) for t in (SeriesSummary, Measurement, Finding)))
    names.add("type")
    assert sorted(names - set(FIELD_ACTIONS)) == []
    # the site's places, network and files are never kept
    for f in ("institution", "station_name", "source_address", "calling_ae", "called_ae",
              "sha256", "store_key", "address", "subject", "payload_sha256", "comment"):
        assert FIELD_ACTIONS[f] is Action.REMOVE, f


def test_registry_uids_are_kept_others_remapped_consistently() -> None:
    p = Pseudonymiser(KEY)
    assert is_standard_uid(CT_IMAGE) and is_standard_uid(EXPLICIT_LE)
    assert not is_standard_uid(STUDY_A1)
    assert p.uid(CT_IMAGE) == CT_IMAGE and p.uid(EXPLICIT_LE) == EXPLICIT_LE
    new = p.uid(STUDY_A1)
    assert new.startswith("2.25.") and new != STUDY_A1 and len(new) <= 64
    assert new == Pseudonymiser(KEY).uid(STUDY_A1) != Pseudonymiser(b"y" * 32).uid(STUDY_A1)
    assert export_key(KEY) != KEY and export_key(KEY) == export_key(KEY)


def _stored(study: str, patient: str, sop: str) -> InstanceStored:
    return InstanceStored.new(
        actor="STORESCU", study_uid=study, sop_instance_uid=sop, sop_class_uid=CT_IMAGE,
        series_uid=study + ".1", transfer_syntax_uid=EXPLICIT_LE, sha256="a" * 64,
        size_bytes=10, store_key=f"aa/{'a' * 64}.dcm", calling_ae="STORESCU",
        called_ae="LM_LTS", source_address="10.1.2.3", institution="St Elsewhere",
        station_name="CT01", patient_pseudonym=patient, patient_sex="F", age_band="40-49",
        study_date="20260105", series_description=f"CT {study} at St Elsewhere",
        occurred_at=datetime(2026, 1, 5, 9, 30, tzinfo=UTC))


def test_events_are_deidentified_field_by_field_with_one_shift_per_patient() -> None:
    evs = [_stored(STUDY_A1, "pat-a", STUDY_A1 + ".1.1"),
           _stored(STUDY_A2, "pat-a", STUDY_A2 + ".1.1"),
           _stored(STUDY_B, "pat-b", STUDY_B + ".1.1")]
    deid = Deidentifier(Pseudonymiser(KEY), LogContext.of(zip((10, 20, 30), evs, strict=True)))
    a1, a2, b = (deid.event(e) for e in evs)
    for out, ev in ((a1, evs[0]), (b, evs[2])):
        for gone in ("institution", "station_name", "source_address", "calling_ae",
                     "called_ae", "sha256", "store_key", "patient_sex", "age_band"):
            assert gone not in out
        assert out["sop_class_uid"] == CT_IMAGE and out["transfer_syntax_uid"] == EXPLICIT_LE
        assert out["study_uid"] == deid.pseudo.uid(ev.study_uid or "")
        assert out["event_id"] != ev.event_id and out["correlation_id"] != ev.correlation_id
        assert out["actor"].startswith("U-") and out["patient_pseudonym"].startswith("P-")
        # the description keeps its words, not the UID or the institution
        assert out["series_description"].startswith("CT 2.25.")
        assert "St Elsewhere" not in out["series_description"]
    # one patient, one shift: the date and the time of day move together, intervals kept
    shift_a = deid.pseudo.shift_days("pat-a")
    assert MIN_SHIFT_DAYS <= -shift_a <= MAX_SHIFT_DAYS
    assert a1["study_date"] == a2["study_date"] == (
        datetime(2026, 1, 5) + timedelta(days=shift_a)).strftime("%Y%m%d")
    assert datetime.fromisoformat(a1["occurred_at"]) == evs[0].occurred_at + timedelta(
        days=shift_a)
    assert a1["patient_pseudonym"] == a2["patient_pseudonym"] != b["patient_pseudonym"]
    assert deid.removed["institution"] == 3 and deid.manifest()["removed_fields"]
    # the row of events.parquet: a timestamp, the position in the export
    row = event_row(30, evs[2], deid)
    assert row["occurred_at"] == evs[2].occurred_at + timedelta(
        days=deid.pseudo.shift_days("pat-b")) and row["sequence"] == 3


def test_uids_in_result_keys_details_and_nested_structs_are_remapped() -> None:
    run_key = "0123456789abcdef0123456789abcdef"
    seg_uid = "1.2.826.0.1.3680043.10.511.3.99"
    done = InferenceCompleted.new(
        actor="worker:host:42", study_uid=STUDY_A1, pipeline="lts", run_key=run_key,
        model_name="m", model_version="1", runtime="cpu", runtime_reason="no GPU",
        duration_s=1.0, inference_s=0.5, selected_series=(STUDY_A1 + ".1",),
        result_keys=(f"{run_key}/seg-{seg_uid}.dcm",),
        findings=(Finding(label="x", classification="y", sop_instance_uid=seg_uid),),
        patient_pseudonym="pat-a", study_date="20260105")
    detail = OperatorFinished.new(
        actor="w", study_uid=STUDY_A1, pipeline="lts", run_key=run_key, operator="load",
        index=1, duration_s=0.1,
        detail=f"series {STUDY_A1}.1 from /srv/lastmile/instances/ab/{'b' * 64}.dcm")
    completed = StudyCompleted.new(actor="c", study_uid=STUDY_A1, reason="forced",
                                   series_count=1, instance_count=1, latency_s=0.0,
                                   series=(SeriesSummary(series_uid=STUDY_A1 + ".1"),),
                                   first_instance_at="2026-01-05T09:30:00+00:00")
    failed = PublishFailed.new(actor="w", study_uid=STUDY_A1, run_key=run_key,
                               destination="pacs:ORTHANC_MAIN", error="ORTHANC_MAIN refused",
                               attempt=1, will_retry=True,
                               address="ORTHANC_MAIN@10.0.0.9:4242")
    deployed = PipelineDeployed.new(actor="admin", pipeline="lts", name="lts", version="1",
                                    file_sha256="c" * 64)
    evs = list(enumerate([done, detail, completed, failed, deployed], 1))
    deid = Deidentifier(Pseudonymiser(KEY), LogContext.of(evs))
    d, o, c, f, p = (deid.event(e) for _, e in evs)
    new_seg = deid.pseudo.uid(seg_uid)
    assert d["result_keys"] == [f"{deid.pseudo.ident(run_key)}/seg-{new_seg}.dcm"]
    assert d["run_key"] == o["run_key"] == deid.pseudo.ident(run_key)
    assert d["findings"][0]["sop_instance_uid"] == new_seg
    assert d["selected_series"] == [deid.pseudo.uid(STUDY_A1 + ".1")]
    assert c["series"][0]["series_uid"] == d["selected_series"][0]  # joins inside the export
    assert o["detail"] == f"series {d['selected_series'][0]} from <path>"
    assert f["destination"] == "pacs" and "address" not in f
    assert "ORTHANC_MAIN" not in f["error"]
    assert c["first_instance_at"].startswith(
        (datetime(2026, 1, 5) + timedelta(days=deid.pseudo.shift_days("pat-a"))).strftime(
            "%Y-%m-%d"))
    assert p["file_sha256"] == "c" * 64  # the pipeline file's hash: provenance, no patient
    text = msgspec.json.encode([d, o, c, f]).decode()
    for original in (STUDY_A1, seg_uid, run_key, "/srv/lastmile", "10.0.0.9"):
        assert original not in text


@pytest.mark.parametrize("bad", ["", "2026", "notadate"])
def test_unparseable_dates_are_dropped_not_kept(bad: str) -> None:
    assert Pseudonymiser(KEY).shift_date(bad, -400) in ("",)
