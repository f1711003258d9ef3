"""Issue 14 items 2 and 4 and issue 18 item 2 through the worker, on a real nats-server:

- a study shaped like the real de-identified GE MR export (no PatientBirthDate,
  PatientSex, AccessionNumber, StudyDate, StudyTime; empty SliceThickness) completes
  with a dciodvfy-clean SEG and SR;
- input a pure step cannot handle fails final at the first attempt: the model runs
  once, never once per retry (counted);
- with every text attribute malformed around a marker, no marker reaches an event or
  a log line;
- intensity follows the image's own Bits Stored: a 16-bit DX is read like the 12-bit
  CR it was made from (a fixed 0..4095 range saturated it); colour and out-of-contract
  images are refused with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from demo.phantoms import brain_mr_study, pelvis_study
from engine.dicom_results import Provenance
from engine.errors import OperatorError, safe_reason
from engine.feed import encode as feed_encode
from engine.feed import feed_study
from engine.ops.selection import describe_series, select_series
from engine.registry import deployed_event
from engine.runtimes import Runtime, load_runtime, probe_host, select_runtime
from engine.spec import LoadedPipeline, load_pipeline
from engine.steps import RunContext, run_steps
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import (
    InferenceCompleted,
    InferenceFailed,
    InferenceSkipped,
    OperatorFinished,
    Stage,
)
from events.codec import encode
from events.jetstream import EventBus
from tests.engine.conftest import SECRET, RunningWorker, dciodvfy_errors, has, wait_for
from tests.malformed import MARKER, malformed

pytestmark = [pytest.mark.server, pytest.mark.slow]

class CountingRuntime:
    """The real runtime, counting its calls (how often the model ran)."""

    def __init__(self, inner: Runtime) -> None:
        self.inner, self.name, self.calls = inner, inner.name, 0

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.inner.run(batch)


def _counting(worker: EngineWorker, loaded: LoadedPipeline) -> CountingRuntime:
    choice = select_runtime(loaded.spec.runtime, worker.host)
    counting = CountingRuntime(worker._runtime(loaded, choice))
    worker._runtimes[(loaded.spec.model.sha256, choice.name)] = counting
    return counting


async def test_a_ge_like_study_without_type2_attributes_completes_with_valid_results(
    bus: EventBus, reference: dict, worker_config: WorkerConfig,
) -> None:
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(51)
    for ds in study.datasets:
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate",
                        "StudyTime"):
            delattr(ds, keyword)
        ds.SliceThickness = None
    worker = EngineWorker({"bts": bts}, worker_config)
    async with RunningWorker(bus, worker):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        evs = await wait_for(bus, study.study_uid, has("engine.inference.completed"),
                             timeout_s=240)
    assert not any(isinstance(e, InferenceFailed) for e in evs)
    done = next(e for e in evs if isinstance(e, InferenceCompleted))
    assert len(done.result_keys) == 2 and done.study_date is None
    for key in done.result_keys:
        assert dciodvfy_errors(worker_config.results_dir / key) == [], key


async def test_bad_input_fails_final_at_once_and_the_model_runs_once(
    bus: EventBus, reference: dict, worker_config: WorkerConfig,
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(52, images=1, size=256)
    # a SOP Instance UID no result can refer to (letters: seen from old modalities);
    # the model runs, then writing the SR fails on the same bytes every time
    study.datasets[0].SOPInstanceUID = f"1.2.840.113619.{MARKER}.1"
    worker = EngineWorker({"hfd": hfd}, worker_config)  # max_attempts=2 in these tests
    counting = _counting(worker, hfd)
    async with RunningWorker(bus, worker):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        evs = await wait_for(bus, study.study_uid, has("engine.inference.failed"))
    (failed,) = [e for e in evs if isinstance(e, InferenceFailed)]
    assert failed.final and failed.attempt == 1 and failed.operator == "write_sr"
    assert "SOPInstanceUID" in failed.error and MARKER not in failed.error
    assert str(study.datasets[0].SeriesInstanceUID) in failed.error  # names the series
    assert counting.calls == 1  # once, not once per attempt
    assert not any(e.type_name() in ("system.delivery.failed", "engine.result.published")
                   for e in evs)
    assert not list(worker_config.results_dir.glob("**/*.dcm"))  # nothing kept or sent


async def test_no_dicom_value_reaches_an_event_or_a_log_line(
    bus: EventBus, reference: dict, worker_config: WorkerConfig,
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder,
) -> None:
    caplog.set_level(logging.DEBUG)
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    ok = pelvis_study(53, images=2, size=256)
    failing = pelvis_study(54, images=1, size=256)
    with pydicom.config.disable_value_validation():  # the sender's side, not ours
        for ds in ok.datasets + failing.datasets:
            malformed(ds)
        # UIDs may appear in events (DESIGN: deep links need them); text values may not
        failing.datasets[0].SOPInstanceUID = "1.2.840.113619.ABC.9"
        raw = {s.study_uid: [feed_encode(ds) for ds in s.datasets] for s in (ok, failing)}
    caplog.clear()
    recwarn.clear()
    async with RunningWorker(bus, EngineWorker({"hfd": hfd}, worker_config)):
        for study in (ok, failing):
            await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                             pipeline="hfd", called_ae="LM_HFD", raw=raw[study.study_uid])
        ok_evs = await wait_for(bus, ok.study_uid, has("engine.inference.completed"))
        bad_evs = await wait_for(bus, failing.study_uid, has("engine.inference.failed"))
    done = next(e for e in ok_evs if isinstance(e, InferenceCompleted))
    for key in done.result_keys:  # the malformed values did not make the SR invalid
        assert dciodvfy_errors(worker_config.results_dir / key) == []
    events = ok_evs + bad_evs
    assert any(isinstance(e, OperatorFinished) for e in events)
    for event in events:
        body = encode(event)[1].decode("utf-8", "replace")
        assert MARKER not in body and MARKER.lower() not in body, event.type_name()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged and MARKER not in logged and MARKER.lower() not in logged
    warned = "\n".join(str(w.message) for w in recwarn)
    assert MARKER not in warned and MARKER.lower() not in warned


def test_a_third_party_message_never_passes_the_operator_boundary() -> None:
    try:
        pydicom.valuerep.DA("13.04.1937")
    except ValueError as exc:
        assert "13.04.1937" in str(exc)  # pydicom quotes the value
        wrapped = OperatorError("write_sr", exc, "1.2.3")
    assert "13.04.1937" not in str(wrapped) and "ValueError in pydicom" in str(wrapped)
    assert wrapped.final and "series 1.2.3" in str(wrapped)
    named = ValueError("Invalid value for VR DA in PatientBirthDate: '13.04.1937'")
    assert "PatientBirthDate (0010,0030)" in safe_reason(named)
    assert "13.04.1937" not in safe_reason(named)
    assert not OperatorError("sliding_window", MemoryError(), None).final  # an edge


# --------------------------------------------------------------------------- intensity


def _findings(pipeline: LoadedPipeline, datasets: list[Dataset]) -> list[tuple[str, str]]:
    runtime = load_runtime(select_runtime(pipeline.spec.runtime, probe_host()),
                           pipeline.model_path, pipeline.spec.model.sha256)
    ctx = RunContext(pipeline=pipeline, runtime=runtime, datasets=datasets,
                     provenance=Provenance("m", "1", "ab" * 32, "hfd", "1", "rk"))
    run_steps(ctx)
    return [(d.label, d.classification) for _, d in ctx.detections]


def _as_16bit_dx(ds: Dataset) -> Dataset:
    """The same radiograph as a 16-bit DX writes it: values x16, Bits Stored 16."""
    out = ds.copy()
    out.PixelData = (ds.pixel_array.astype(np.uint32) * 16).astype(np.uint16).tobytes()
    out.BitsStored, out.HighBit = 16, 15
    return out


def test_a_16bit_dx_is_read_within_its_own_bit_depth(reference: dict, tmp_path: Path
                                                     ) -> None:
    hfd = reference["hfd"]
    study = pelvis_study(55, images=2, size=256, classes=("fracture", "hardware"))
    sixteen = [_as_16bit_dx(ds) for ds in study.datasets]
    truth = _findings(hfd, study.datasets)
    assert sorted(c for _, c in truth) != ["normal"] * 4  # the model sees the findings
    assert _findings(hfd, sixteen) == truth
    # the old fixed range saturates the same images (what the issue saw: all "normal")
    data = yaml.safe_load(hfd.path.read_text())
    data["model"].update(path=str(hfd.model_path), card=str(hfd.card_path))
    for op in data["operators"]:
        if op["op"] == "normalize":
            op["params"] = {"method": "range", "low": 0, "high": 4095}
    fixed = tmp_path / "hfd.yaml"
    fixed.write_text(yaml.safe_dump(data, sort_keys=False))
    assert _findings(load_pipeline(fixed), sixteen) != truth


def test_colour_and_out_of_contract_images_are_refused_with_their_reason(
    reference: dict,
) -> None:
    hfd = reference["hfd"]
    colour = pydicom.dcmread(get_testdata_file("US1_UNCI.dcm"))  # real RGB ultrasound
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))  # real 15-bit CR, spacing 0
    for ds in (colour, cr):
        ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = "CR", "PELVIS AP", "PELVIS"
    chest = pelvis_study(56, images=1, size=256).datasets[0]
    chest.BodyPartExamined = "CHEST"
    contract = hfd.spec.input.contract()
    rule = hfd.spec.selection.rule()
    reasons = {}
    for name, ds in (("colour", colour), ("cr", cr), ("chest", chest)):
        sel = select_series(describe_series([ds]), rule, contract)
        assert not sel.chosen
        reasons[name] = sel.rejected[0][1]
    assert reasons["colour"].startswith("colour images are not supported by this model")
    assert "no usable pixel spacing" in reasons["cr"]
    assert "body part is not one this model was validated on" in reasons["chest"]
    assert "CHEST" not in reasons["chest"].split("(")[0]


async def test_a_colour_study_is_skipped_with_the_contract_reason(
    bus: EventBus, reference: dict, worker_config: WorkerConfig,
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    colour = pydicom.dcmread(get_testdata_file("US1_UNCI.dcm"))
    colour.Modality, colour.SeriesDescription = "CR", "PELVIS AP"
    counting: CountingRuntime | None = None
    worker = EngineWorker({"hfd": hfd}, worker_config)
    counting = _counting(worker, hfd)
    async with RunningWorker(bus, worker):
        await feed_study(bus, [colour], worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        evs = await wait_for(bus, str(colour.StudyInstanceUID),
                             has("engine.inference.skipped"))
    skipped = next(e for e in evs if isinstance(e, InferenceSkipped))
    assert any("colour images are not supported by this model" in line
               for line in skipped.rejected_series)
    assert counting.calls == 0
