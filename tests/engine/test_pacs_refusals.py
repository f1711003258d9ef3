"""Issue 14 item 5: a PACS decides per object. Against real peers: pynetdicom Storage
SCPs that take only some SOP classes or answer 0x0122, and a closed port.

Each object the PACS refuses is recorded with its DICOM status, final, and is never sent
again; what it takes is sent (the SR when the SEG is refused); a PACS that does not
answer is "unreachable", never "refused".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    SegmentationStorage,
)

from demo.phantoms import brain_mr_study
from engine import pacs
from engine.dicom_results import Provenance, SegmentMeasurement, build_seg, build_volume_sr
from engine.errors import PublishFailedError
from engine.feed import feed_study
from engine.ops.volume import series_to_volume
from engine.pacs_redelivery import pending
from engine.registry import deployed_event
from engine.spec import LoadedPipeline, load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import InferenceCompleted, PublishFailed, ResultPublished, Stage
from events.jetstream import EventBus
from events.nats_server import free_port
from tests.engine.conftest import SECRET, RunningWorker, has, wait_for

PROV = Provenance("unit-model", "2.1", "ab" * 32, "bts", "1.0.0", "run-pacs")


@dataclass
class ScriptedPacs:
    """A real pynetdicom Storage SCP: which SOP classes it negotiates, and the status it
    answers per SOP class (0x0000 unless scripted)."""

    classes: tuple[str, ...]
    statuses: dict[str, int] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    received: list[str] = field(default_factory=list)  # SOP Class UIDs, each C-STORE
    associations: int = 0

    def __post_init__(self) -> None:
        self.ae = AE(ae_title="SCRIPTED")
        for uid in self.classes:
            self.ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPClassUID)
        self.received.append(uid)
        return self.statuses.get(uid, 0x0000)

    def _assoc(self, event: evt.Event) -> None:
        self.associations += 1

    def __enter__(self) -> ScriptedPacs:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_REQUESTED, self._assoc)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    @property
    def address(self) -> pacs.PacsAddress:
        return pacs.PacsAddress("SCRIPTED", "127.0.0.1", self.port)


@pytest.fixture(scope="module")
def results() -> list[Dataset]:
    study = brain_mr_study(41)
    vol = series_to_volume([d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"])
    assert study.labels is not None
    seg = build_seg(vol.sources, study.labels, {1: "lesion"}, PROV, series_description="AI")
    sr = build_volume_sr(seg, vol.sources, [SegmentMeasurement(1, "lesion", 1.0)], PROV)
    return [seg, sr]


def test_a_pacs_without_segmentation_gets_the_sr_and_the_seg_is_refused_once(
    results: list[Dataset],
) -> None:
    seg, sr = results
    with ScriptedPacs((Comprehensive3DSRStorage,)) as peer:
        outcomes = pacs.c_store(results, peer.address, retries=3, retry_delay_s=0.05)
    by_uid = {o.sop_instance_uid: o for o in outcomes}
    assert by_uid[str(sr.SOPInstanceUID)].refused is False
    refused = by_uid[str(seg.SOPInstanceUID)]
    assert refused.refused and refused.code == pacs.NO_CONTEXT
    assert "no presentation context" in refused.status
    assert peer.received == [Comprehensive3DSRStorage]  # the SR, once
    assert peer.associations == 1  # a refusal is not retried


def test_status_0122_is_a_final_refusal_of_that_object_only(results: list[Dataset]) -> None:
    seg, sr = results
    with ScriptedPacs((SegmentationStorage, Comprehensive3DSRStorage),
                      {SegmentationStorage: 0x0122}) as peer:
        outcomes = pacs.c_store(results, peer.address, retries=3, retry_delay_s=0.05)
    by_uid = {o.sop_instance_uid: o for o in outcomes}
    assert by_uid[str(seg.SOPInstanceUID)].refused
    assert by_uid[str(seg.SOPInstanceUID)].code == 0x0122
    assert by_uid[str(seg.SOPInstanceUID)].status_hex == "0x0122"
    assert not by_uid[str(sr.SOPInstanceUID)].refused
    assert peer.associations == 1 and len(peer.received) == 2


def test_a_pacs_taking_none_of_the_classes_refuses_both_and_is_not_retried(
    results: list[Dataset],
) -> None:
    with ScriptedPacs((CTImageStorage,)) as peer:  # negotiates, accepts no context
        outcomes = pacs.c_store(results, peer.address, retries=3, retry_delay_s=0.05)
    assert [(o.refused, o.code) for o in outcomes] == [(True, pacs.NO_CONTEXT)] * 2
    assert peer.associations == 1 and peer.received == []


@pytest.mark.parametrize(("code", "permanent"), [
    (0x0122, True), (0x0124, True), (0xA700, True), (0xA900, True), (0xC123, True),
    (0x0110, False), (0x0213, False)])
def test_which_statuses_are_permanent(code: int, permanent: bool) -> None:
    assert pacs.is_permanent(code) is permanent


def test_a_transient_status_is_retried_and_reported_unreachable(
    results: list[Dataset],
) -> None:
    with ScriptedPacs((SegmentationStorage, Comprehensive3DSRStorage),
                      {SegmentationStorage: 0x0110}) as peer:  # Processing failure
        with pytest.raises(PublishFailedError) as caught:
            pacs.c_store(results, peer.address, retries=2, retry_delay_s=0.05)
    assert "unreachable" in str(caught.value) and "refused" not in str(caught.value)
    assert peer.associations == 3
    # the SR the PACS took on the first association is not sent again
    assert peer.received.count(Comprehensive3DSRStorage) == 1
    assert [o.refused for o in caught.value.outcomes] == [False]


def test_a_closed_port_is_unreachable_not_refused(results: list[Dataset]) -> None:
    dest = pacs.PacsAddress("NOBODY", "127.0.0.1", free_port())
    with pytest.raises(PublishFailedError, match="unreachable") as caught:
        pacs.c_store(results, dest, retries=1, retry_delay_s=0.05, timeout_s=2)
    assert "refused by" not in str(caught.value) and caught.value.outcomes == []


@pytest.fixture
def peer_without_seg() -> Iterator[ScriptedPacs]:
    with ScriptedPacs((Comprehensive3DSRStorage,)) as peer:
        yield peer


def _with_scripted(loaded: LoadedPipeline, tmp: Path, peer: ScriptedPacs) -> LoadedPipeline:
    data = yaml.safe_load(loaded.path.read_text())
    data["model"]["path"] = str(loaded.model_path)
    data["model"]["card"] = str(loaded.card_path)
    data["publishers"] = [{"kind": "store"},
                          {"kind": "pacs", "ae_title": "SCRIPTED", "host": "127.0.0.1",
                           "port": peer.port, "retries": 2, "retry_delay_s": 0.1}]
    path = tmp / f"{loaded.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_pipeline(path)


@pytest.mark.server
@pytest.mark.slow
async def test_worker_records_the_refusal_with_its_status_and_completes_the_run(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path,
    peer_without_seg: ScriptedPacs,
) -> None:
    bts = _with_scripted(reference["bts"], tmp_path, peer_without_seg)
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(42)
    worker = EngineWorker({"bts": bts}, worker_config)
    async with RunningWorker(bus, worker):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        evs = await wait_for(bus, study.study_uid, has("engine.inference.completed"),
                             timeout_s=240)
    assert [o.status for o in worker.outcomes] == ["completed"]  # one run, no retry
    to_pacs = [e for e in evs if getattr(e, "destination", "") == "pacs:SCRIPTED"]
    (published,) = [e for e in to_pacs if isinstance(e, ResultPublished)]
    (refusal,) = [e for e in to_pacs if isinstance(e, PublishFailed)]
    assert published.kind == "SR"
    assert refusal.refused and not refusal.will_retry and refusal.kind == "SEG"
    assert refusal.status is None and "no presentation context" in refusal.error
    assert "refused by pacs:SCRIPTED" in refusal.error and "unreachable" not in refusal.error
    done = next(e for e in evs if isinstance(e, InferenceCompleted))
    assert pending(done, evs) == []  # the redelivery consumer has nothing to resend
    assert peer_without_seg.received == ["1.2.840.10008.5.1.4.1.1.88.34"]
    assert np.all([e.attempt == 1 for e in to_pacs])
