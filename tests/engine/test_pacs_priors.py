"""Priors from the PACS (issue 16, item 7): a BTS study sent to Lastmile alone is compared
with the patient's earlier exams that only the PACS (a real Orthanc) holds; they are found
by C-FIND, sent by C-MOVE to Lastmile's own receiver (the normal ingest path), and each
step is an event. "No prior in the PACS" is final and the run proceeds without change
figures; a PACS that cannot be asked fails the run for a retry, with a bound."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from demo.phantoms import brain_mr_study, fake_patient
from engine.feed import feed_study
from engine.pacs import PacsAddress
from engine.pacs_priors import PriorSource, PriorStudy, choose, earlier_matches, find_query
from engine.registry import deployed_event
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import (
    InferenceCompleted,
    InferenceFailed,
    InstanceStored,
    OperatorFinished,
    PriorOutcome,
    PriorRetrieved,
    PriorsSearched,
    RetrieveOutcome,
    Stage,
)
from events.jetstream import EventBus
from events.nats_server import free_port
from tests.engine.conftest import SECRET, Orthanc, RunningWorker, has, wait_for

STORESCU = shutil.which("storescu")


# ------------------------------------------------------------------ pure parts


def _match(uid: str, day: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.StudyDate = uid, day
    return ds


def test_query_asks_for_the_patients_studies_up_to_the_day_before() -> None:
    q = find_query("PID-1", "20260301", "MR")
    assert q.QueryRetrieveLevel == "STUDY"
    assert q.StudyDate == "-20260228"  # a range ending the day before (PS3.4 C.2.2.2.5)
    assert q.ModalitiesInStudy == "MR" and q.StudyInstanceUID == ""


def test_only_earlier_readable_studies_count_and_baseline_and_latest_are_chosen() -> None:
    matches = [_match("1.5", "20250601"), _match("1.current", "20260301"),
               _match("1.later", "20260401"), _match("1.same-day", "20260301"),
               _match("1.3", "2025.01.01"), _match("1.bad", "2025-13-01"),
               _match("1.4", "20250301"), _match("", "20250101")]
    found = earlier_matches(matches, "20260301", "1.current")
    assert found == [PriorStudy("1.3", "20250101"), PriorStudy("1.4", "20250301"),
                     PriorStudy("1.5", "20250601")]
    assert [p.study_uid for p in choose(found, 2)] == ["1.3", "1.5"]  # baseline, latest
    assert [p.study_uid for p in choose(found, 3)] == ["1.3", "1.5", "1.4"]
    assert choose(found[:1], 2) == found[:1] and choose([], 2) == []


# ------------------------------------------------------------------ against Orthanc

async def _storescu(port: int, called: str, files: list[Path]) -> None:
    assert STORESCU is not None
    proc = await asyncio.create_subprocess_exec(
        STORESCU, "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port),
        *map(str, files), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"})
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode(errors="replace")


@asynccontextmanager
async def _receiver(bus: EventBus, instances_dir: Path, port: int) -> AsyncIterator[None]:
    """Lastmile's real ingest: receiver on ``port`` and completion detector."""
    from ingest.app import IngestApp, IngestOptions
    from ingest.dicom_scp import ScpConfig
    from ingest.rules_file import RulesFile

    ingest = IngestApp(IngestOptions(instances_dir=instances_dir, scp=ScpConfig(port=port),
                                     min_free_bytes=0), SECRET, RulesFile.open(None))
    stop = asyncio.Event()
    task = asyncio.create_task(ingest.run(bus, stop))
    try:
        await asyncio.wait_for(ingest.scp.started.wait(), 15)
        while ingest.detector is None or not ingest.detector.ready.is_set():
            await asyncio.sleep(0.02)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def _volume(done: InferenceCompleted) -> float:
    return next(m.value for m in done.measurements if m.name == "volume_lesion")


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(STORESCU is None, reason="Debian dcmtk not installed")
async def test_bts_compares_with_priors_fetched_from_orthanc(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path,
) -> None:
    scp_port = free_port()
    # like a PACS, Orthanc answers only AEs it knows: our calling AE (queries) and the
    # move destination (where it sends: Lastmile's receiver)
    orthanc = Orthanc(tmp_path / "orthanc", modalities={
        "lastmile": ["LASTMILE", "127.0.0.1", scp_port],
        "lastmile-bts": ["LM_BTS", "127.0.0.1", scp_port]}).start()
    try:
        patient = fake_patient(7070)
        baseline = brain_mr_study(7071, patient=patient, study_date="20250101",
                                  lesion_radius_mm=11.0, extra_localizer=False)
        middle = brain_mr_study(7072, patient=patient, study_date="20250601",
                                lesion_radius_mm=12.0, extra_localizer=False)
        latest = brain_mr_study(7073, patient=patient, study_date="20251001",
                                lesion_radius_mm=13.0, extra_localizer=False)
        other = brain_mr_study(7074, study_date="20250301", lesion_radius_mm=9.0,
                               extra_localizer=False)  # another patient's earlier exam
        current = brain_mr_study(7075, patient=patient, study_date="20260101",
                                 lesion_radius_mm=16.0)
        for s in (baseline, middle, latest, other):  # the PACS holds the priors ...
            await _storescu(orthanc.dicom_port, orthanc.ae_title,
                            s.write(tmp_path / "pacs" / s.study_uid))
        bts = reference["bts"]
        await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
        config = replace(worker_config, priors=PriorSource(
            PacsAddress(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port), retries=1,
            retry_delay_s=0.2))
        async with _receiver(bus, worker_config.instances_dir, scp_port), \
                RunningWorker(bus, EngineWorker({"bts": bts}, config)):
            # ... and only the current study is sent to Lastmile
            await _storescu(scp_port, "LM_BTS", current.write(tmp_path / "current"))
            events = await wait_for(bus, current.study_uid,
                                    has("engine.inference.completed"), 240)
            baseline_events = await bus.history(baseline.study_uid)
            latest_events = await bus.history(latest.study_uid)
            middle_events = await bus.history(middle.study_uid)
    finally:
        orthanc.stop()
    searched = [e for e in events if isinstance(e, PriorsSearched)]
    assert len(searched) == 1 and searched[0].outcome == PriorOutcome.FOUND
    assert searched[0].modality == "MR" and searched[0].before_date == "20260101"
    # the other patient's exam is not found; baseline and latest are chosen
    assert searched[0].prior_study_uids == (baseline.study_uid, middle.study_uid,
                                            latest.study_uid)
    assert searched[0].chosen_study_uids == (baseline.study_uid, latest.study_uid)
    assert middle_events == []  # found, not fetched
    for study, evs in ((baseline, baseline_events), (latest, latest_events)):
        evs_ = [e for _, e in evs]
        fetched = next(e for e in evs_ if isinstance(e, PriorRetrieved))
        stored = [e for e in evs_ if isinstance(e, InstanceStored)]
        # it entered through the receiver (C-STORE from Orthanc to LM_BTS), every instance
        assert fetched.outcome == RetrieveOutcome.RETRIEVED and fetched.failed == 0
        assert fetched.completed == len(study.datasets) == len(stored)
        assert {e.called_ae for e in stored} == {"LM_BTS"}
        assert {e.calling_ae for e in stored} == {orthanc.ae_title}
        assert fetched.for_study_uid == current.study_uid
        assert any(isinstance(e, InferenceCompleted) for e in evs_)
    done = next(e for e in events if isinstance(e, InferenceCompleted))
    vol_base = _volume(next(e for _, e in baseline_events if isinstance(e, InferenceCompleted)))
    vol_prior = _volume(next(e for _, e in latest_events if isinstance(e, InferenceCompleted)))
    changes = {m.name: m.value for m in done.measurements}
    assert abs(changes["change_from_baseline_lesion"]
               - (_volume(done) - vol_base) / vol_base * 100) < 1e-3
    assert abs(changes["change_from_prior_lesion"]
               - (_volume(done) - vol_prior) / vol_prior * 100) < 1e-3
    assert done.progression is True  # 13 mm -> 16 mm radius: +86% in volume
    # the patient's identity reached no event
    for ev in events + [e for _, e in baseline_events + latest_events]:
        assert patient.patient_id not in repr(ev) and patient.name not in repr(ev)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(STORESCU is None, reason="Debian dcmtk not installed")
async def test_no_prior_in_the_pacs_is_final_and_the_run_says_so(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path,
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc",
                      modalities={"lastmile": ["LASTMILE", "127.0.0.1", 104]}).start()
    try:
        await _no_prior(bus, reference, worker_config, orthanc, tmp_path)
    finally:
        orthanc.stop()


async def _no_prior(bus: EventBus, reference: dict, worker_config: WorkerConfig,
                    orthanc: Orthanc, tmp_path: Path) -> None:
    patient = fake_patient(8080)
    later = brain_mr_study(8081, patient=patient, study_date="20260601",
                           lesion_radius_mm=12.0, extra_localizer=False)
    other = brain_mr_study(8082, study_date="20250101", lesion_radius_mm=12.0,
                           extra_localizer=False)
    for s in (later, other):  # the patient's *later* exam, another patient's earlier one
        await _storescu(orthanc.dicom_port, orthanc.ae_title,
                        s.write(tmp_path / "pacs" / s.study_uid))
    current = brain_mr_study(8083, patient=patient, study_date="20260101",
                             lesion_radius_mm=14.0)
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    config = replace(worker_config, priors=PriorSource(
        PacsAddress(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)))
    async with RunningWorker(bus, EngineWorker({"bts": bts}, config)):
        await feed_study(bus, current.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        events = await wait_for(bus, current.study_uid, has("engine.inference.completed"),
                                120)
    searched = next(e for e in events if isinstance(e, PriorsSearched))
    assert searched.outcome == PriorOutcome.NONE and searched.final
    assert searched.prior_study_uids == () and "no earlier MR study" in searched.reason
    done = next(e for e in events if isinstance(e, InferenceCompleted))
    assert done.progression is None
    assert not any(m.name.startswith("change_from") for m in done.measurements)
    longitudinal = next(e for e in events
                        if isinstance(e, OperatorFinished) and e.operator == "longitudinal")
    assert longitudinal.detail == "no earlier exam"
    assert not any(isinstance(e, PriorRetrieved) for e in events)
    assert await bus.history(later.study_uid) == []  # nothing was fetched


@pytest.mark.server
@pytest.mark.slow
async def test_unreachable_pacs_fails_the_run_for_a_bounded_retry(
    bus: EventBus, reference: dict, worker_config: WorkerConfig,
) -> None:
    current = brain_mr_study(9091, study_date="20260101", lesion_radius_mm=14.0)
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    nobody = PacsAddress("PACS", "127.0.0.1", free_port())  # nothing listens there
    config = replace(worker_config, priors=PriorSource(nobody, retries=1, retry_delay_s=0.1,
                                                       timeout_s=2.0), ack_wait_s=5.0)
    async with RunningWorker(bus, EngineWorker({"bts": bts}, config)):
        await feed_study(bus, current.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        events = await wait_for(
            bus, current.study_uid,
            lambda evs: any(isinstance(e, InferenceFailed) and e.final for e in evs), 120)
    searched = sorted((e for e in events if isinstance(e, PriorsSearched)),
                      key=lambda e: e.attempt)
    assert [(e.outcome, e.attempt, e.final) for e in searched] == [
        (PriorOutcome.FAILED, 1, False), (PriorOutcome.FAILED, 2, True)]
    assert "refused the connection or did not answer" in searched[0].reason
    assert "after 2 attempts" in searched[0].reason
    failed = sorted((e for e in events if isinstance(e, InferenceFailed)),
                    key=lambda e: e.attempt)
    assert [(e.operator, e.final) for e in failed] == [("fetch_priors", False),
                                                       ("fetch_priors", True)]
    assert not any(isinstance(e, InferenceCompleted) for e in events)


# ------------------------------------------------------------------ site settings


def test_priors_pacs_setting_reaches_the_worker(tmp_path: Path) -> None:
    from lastmile.services_engine import worker_config
    from lastmile.settings import load_settings

    config = tmp_path / "lastmile.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\npriors_pacs = "PACS@pacs.local:104"'
                      '\npriors_move_destination = "LASTMILE"\npriors_retries = 4\n')
    priors = worker_config(load_settings(config)).priors
    assert priors is not None
    assert (priors.address.ae_title, priors.address.host, priors.address.port) == (
        "PACS", "pacs.local", 104)
    assert priors.move_destination == "LASTMILE" and priors.retries == 4
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert worker_config(load_settings(config)).priors is None  # unset: never asked


def test_bad_priors_pacs_setting_names_file_line_and_key(tmp_path: Path) -> None:
    from lastmile.settings import ConfigError, load_settings

    config = tmp_path / "lastmile.toml"
    config.write_text('state_dir = "x"\n\npriors_pacs = "pacs.local:104"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert f"{config}:3: priors_pacs:" in str(err.value)
    assert "AE@host:port" in str(err.value)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(STORESCU is None, reason="Debian dcmtk not installed")
async def test_a_prior_the_pacs_will_not_send_is_a_retried_failure_with_its_status(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path,
) -> None:
    # Orthanc answers our queries but knows no move destination "LM_BTS"
    orthanc = Orthanc(tmp_path / "orthanc",
                      modalities={"lastmile": ["LASTMILE", "127.0.0.1", 104]}).start()
    try:
        patient = fake_patient(6060)
        prior = brain_mr_study(6061, patient=patient, study_date="20250101",
                               lesion_radius_mm=12.0, extra_localizer=False)
        await _storescu(orthanc.dicom_port, orthanc.ae_title, prior.write(tmp_path / "pacs"))
        current = brain_mr_study(6062, patient=patient, study_date="20260101",
                                 lesion_radius_mm=14.0)
        bts = reference["bts"]
        await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
        config = replace(worker_config, priors=PriorSource(
            PacsAddress(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port), retries=0))
        async with RunningWorker(bus, EngineWorker({"bts": bts}, config)):
            await feed_study(bus, current.datasets, worker_config.instances_dir, SECRET,
                             pipeline="bts", called_ae="LM_BTS")
            events = await wait_for(
                bus, current.study_uid,
                lambda evs: any(isinstance(e, InferenceFailed) and e.final for e in evs), 120)
            prior_events = [e for _, e in await bus.history(prior.study_uid)]
    finally:
        orthanc.stop()
    searched = [e for e in events if isinstance(e, PriorsSearched)]
    assert {(e.outcome, e.chosen_study_uids) for e in searched} == {
        (PriorOutcome.FOUND, (prior.study_uid,))}
    refused = sorted((e for e in prior_events if isinstance(e, PriorRetrieved)),
                     key=lambda e: e.attempt)
    assert [(e.outcome, e.attempt) for e in refused] == [(RetrieveOutcome.FAILED, 1),
                                                         (RetrieveOutcome.FAILED, 2)]
    assert "C-MOVE to LM_BTS" in refused[0].reason
    # Orthanc 1.10 answers an unknown destination with 0xC000-range, named, not a number
    assert "Failure: Unable to Process" in refused[0].reason
    assert not any(isinstance(e, InstanceStored) for e in prior_events)
    failed = [e for e in events if isinstance(e, InferenceFailed)]
    assert {e.operator for e in failed} == {"fetch_priors"}
    assert not any(isinstance(e, InferenceCompleted) for e in events)
