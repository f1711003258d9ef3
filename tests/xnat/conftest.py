"""XNAT test helpers: the XNAT STAND-IN server (``standin.py``), a real result to publish.

The result is real DICOM: a CT image from pydicom's test files stored in a
content-addressed instance store, and a highdicom SEG of it written to the results
folder the way the engine worker lays it out (``<run key>/seg-<SOP UID>.dcm``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from events.base import Event
from events.catalogue import InferenceCompleted, InstanceStored, Measurement
from events.instance_store import InstanceStore
from events.jetstream import EventBus
from tests.history import wait_for as _wait_for
from tests.xnat.standin import XnatStandIn

USER, PASSWORD = "lastmile", "xnat-stand-in-pw"
PSEUDONYM = "3f2a9c0d5e7b41a8b6c4d2e0f1a3b5c7"


@pytest.fixture
def standin() -> Iterator[XnatStandIn]:
    """A fresh XNAT stand-in per test (in memory, on a free port)."""
    with XnatStandIn(users={USER: PASSWORD, "dr_reader": "reader-pw"}) as server:
        yield server


def build_seg(source: Dataset, box: tuple[int, int, int, int], label: str = "lesion") -> Dataset:
    """A BINARY SEG of one segment over ``source`` (highdicom; PS3.3 A.51)."""
    mask = np.zeros((1, source.Rows, source.Columns), dtype=bool)
    r0, c0, r1, c1 = box
    mask[0, r0:r1, c0:c1] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="xnat-test", version="1", family=codes.cid7162.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    return hd.seg.Segmentation(
        source_images=[source], pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=90,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Lastmile",
        manufacturer_model_name="xnat-test", software_versions="1",
        device_serial_number="0")


@dataclass
class StudyResult:
    """One study with a completed result, ready to publish."""

    source: Dataset
    stored: InstanceStored
    completed: InferenceCompleted
    seg_path: Path
    instances_dir: Path
    results_dir: Path

    @property
    def study_uid(self) -> str:
        return str(self.source.StudyInstanceUID)

    def events(self) -> list[Event]:
        return [self.stored, self.completed]


@pytest.fixture
def study_result(tmp_path: Path) -> StudyResult:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    instances_dir, results_dir = tmp_path / "instances", tmp_path / "results"
    stored_file = InstanceStore(instances_dir).put(
        [Path(get_testdata_file("CT_small.dcm")).read_bytes()])
    study = str(source.StudyInstanceUID)
    stored = InstanceStored.new(
        actor="LM_LTS", study_uid=study, sop_instance_uid=str(source.SOPInstanceUID),
        sop_class_uid=str(source.SOPClassUID), series_uid=str(source.SeriesInstanceUID),
        transfer_syntax_uid=str(source.file_meta.TransferSyntaxUID),
        sha256=stored_file.sha256, size_bytes=stored_file.size_bytes,
        store_key=stored_file.store_key, calling_ae="MODALITY", called_ae="LM_LTS",
        modality="CT", patient_pseudonym=PSEUDONYM, study_date="20040119")
    run_key = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
    seg = build_seg(source, (20, 20, 40, 44))
    folder = results_dir / run_key
    folder.mkdir(parents=True)
    seg_path = folder / f"seg-{seg.SOPInstanceUID}.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    completed = stored.caused(
        InferenceCompleted, actor="worker:test", pipeline="lts", run_key=run_key,
        model_name="lts-unet", model_version="0.3.1", model_sha256="ab" * 32,
        runtime="onnxruntime-cpu", runtime_reason="no GPU", duration_s=12.5, inference_s=9.0,
        selected_series=(str(source.SeriesInstanceUID),),
        measurements=(Measurement(name="volume", value=123.456789, unit="mL", label="lesion"),),
        result_keys=(f"{run_key}/{seg_path.name}",), patient_pseudonym=PSEUDONYM,
        study_date="20040119")
    return StudyResult(source, stored, completed, seg_path, instances_dir, results_dir)


async def wait_for(bus: EventBus, study_uid: str, done: Callable[[list[Event]], bool],
                   timeout_s: float = 30.0) -> list[Event]:
    return await _wait_for(bus, study_uid, done, timeout_s)


def of_type(events: list[Event], type_name: str) -> list[Event]:
    return [e for e in events if e.type_name() == type_name]
