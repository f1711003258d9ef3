"""Recomputation after a clinician's edit (engine/edits.py).

Real SEG files written with highdicom over phantom source series (dciodvfy-clean), the
expected Dice and volumes computed here from the arrays, independently of the code under
test; the consumer against a real nats-server; the read model folded from that log.
"""

from __future__ import annotations

import asyncio
import copy
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from scipy import ndimage

from demo.phantoms import abdomen_ct_study, brain_mr_study
from engine.dicom_results import Provenance, build_seg
from engine.edits import (
    DURABLE,
    EditConfig,
    EditRecomputer,
    build_edited_seg,
    masks_on_sources,
    read_seg_frames,
    recompute,
)
from engine.ops.volume import series_to_volume
from events.catalogue import (
    DeliveryFailed,
    EditSubmitted,
    InferenceCompleted,
    Measurement,
    MeasurementRecomputed,
)
from events.errors import EditRejected
from events.instance_store import InstanceStore
from events.jetstream import EventBus
from projections import metrics
from projections.duckdb_store import ProjectionStore
from projections.projector import rebuild
from tests.engine.conftest import dciodvfy_errors, wait_for

BTS = {1: "lesion"}
LTS = {1: "left_lobe", 2: "right_lobe", 3: "vessels"}


@dataclass
class Case:
    """An AI result on disk (as the worker stores it) and what it was made from."""

    study_uid: str
    run_key: str
    pipeline: str
    sources: list[Dataset]  # the source series, in slice order
    labels: np.ndarray  # (z, y, x) the AI's label map
    names: dict[int, str]
    spacing: tuple[float, float, float]
    ai_seg: Dataset  # as read back from its file
    result_key: str  # relative to results_dir

    def mask(self, label: str) -> np.ndarray:
        value = next(v for v, n in self.names.items() if n == label)
        return self.labels == value

    def ml(self, mask: np.ndarray) -> float:
        return float(mask.sum()) * float(np.prod(self.spacing)) / 1000.0


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_case(results_dir: Path, pipeline: str = "bts", seed: int = 5) -> Case:
    if pipeline == "bts":
        st = brain_mr_study(seed, extra_localizer=False)
        names = BTS
    else:
        st = abdomen_ct_study(seed)
        names = LTS
    vol = series_to_volume(st.datasets)
    assert st.labels is not None
    run_key = f"run-{pipeline}-{seed}"
    prov = Provenance("unit-model", "1.0", "ab" * 32, pipeline, "1.0.0", run_key)
    seg = build_seg(vol.sources, st.labels, names, prov, series_description=f"AI {pipeline}")
    key = f"{run_key}/seg-{seg.SOPInstanceUID}.dcm"
    path = _save(seg, results_dir / key)
    return Case(st.study_uid, run_key, pipeline, vol.sources, st.labels, names, vol.spacing,
                pydicom.dcmread(path), key)


def eroded(mask: np.ndarray) -> np.ndarray:
    """Each slice eroded by one pixel: the reader trimmed the border of the AI mask."""
    return np.stack([ndimage.binary_erosion(s) for s in mask])


def expected_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def edited(case: Case, masks: dict[str, np.ndarray], tmp: Path, name: str = "edit") -> Dataset:
    """The corrected SEG as a file (dciodvfy-checked) read back."""
    seg = build_edited_seg(case.sources, masks, case.ai_seg, reader="neurorad_a",
                           uid_key=f"{case.run_key}/{name}")
    path = _save(seg, tmp / f"{name}.dcm")
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(path)


def reordered(ds: Dataset, order: list[int], *, drop_source_refs: bool = False) -> Dataset:
    """The same SEG with its frames in another order (as another tool may write them),
    optionally without the per-frame source image references (placed by position only)."""
    out = copy.deepcopy(ds)
    frames = ds.pixel_array.reshape((-1, int(ds.Rows), int(ds.Columns)))
    out.PixelData = pack_bits(frames[order])
    items = [copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[i]) for i in order]
    if drop_source_refs:
        for item in items:
            del item.DerivationImageSequence
    out.PerFrameFunctionalGroupsSequence = items
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return out


# --------------------------------------------------------------------------- pure core


def test_eroded_edit_gives_the_dice_and_volume_computed_from_the_arrays(tmp_path: Path) -> None:
    case = make_case(tmp_path / "results")
    ai = case.mask("lesion")
    cut = eroded(ai)
    assert 0 < cut.sum() < ai.sum()
    result = recompute(case.ai_seg, edited(case, {"lesion": cut}, tmp_path),
                       study_uid=case.study_uid)
    assert result.dice["lesion"] == pytest.approx(expected_dice(ai, cut), abs=1e-12)
    assert result.dice["lesion"] < 0.95
    # voxel = PixelSpacing x slice spacing of the source series (3 x 1.5 x 1.5 mm)
    assert case.spacing == (3.0, 1.5, 1.5)
    assert result.volumes_ml["lesion"] == pytest.approx(case.ml(cut), rel=1e-9)
    assert result.ai_volumes_ml["lesion"] == pytest.approx(case.ml(ai), rel=1e-9)


def test_unchanged_mask_gives_dice_one_and_the_ai_volume(tmp_path: Path) -> None:
    case = make_case(tmp_path / "results")
    same = edited(case, {"lesion": case.mask("lesion")}, tmp_path)
    result = recompute(case.ai_seg, same, study_uid=case.study_uid)
    assert result.dice == {"lesion": 1.0}
    assert result.volumes_ml == result.ai_volumes_ml


def test_frames_in_another_order_compare_the_same(tmp_path: Path) -> None:
    case = make_case(tmp_path / "results")
    ai = case.mask("lesion")
    # drop the two top slices of the lesion and erode the rest
    cut = eroded(ai)
    top = np.flatnonzero(ai.any(axis=(1, 2)))[-2:]
    cut[top] = False
    seg = edited(case, {"lesion": cut}, tmp_path)
    n = int(seg.NumberOfFrames)
    assert n >= 4
    baseline = recompute(case.ai_seg, seg, study_uid=case.study_uid)
    assert baseline.dice["lesion"] == pytest.approx(expected_dice(ai, cut), abs=1e-12)
    rng = np.random.default_rng(3)
    order = [int(i) for i in rng.permutation(n)]
    assert order != list(range(n))
    # matching by frame index instead of position would score the shuffle differently
    own = seg.pixel_array.reshape((n, int(seg.Rows), int(seg.Columns))).astype(bool)
    assert expected_dice(own, own[order]) < 0.9
    for variant, drop in (("shuffled", False), ("shuffled-no-refs", True)):
        other = reordered(seg, order, drop_source_refs=drop)
        path = _save(other, tmp_path / f"{variant}.dcm")
        assert dciodvfy_errors(path) == [], variant
        result = recompute(case.ai_seg, pydicom.dcmread(path), study_uid=case.study_uid)
        assert result.dice == baseline.dice, variant
        assert result.volumes_ml == baseline.volumes_ml, variant
    # the AI's own SEG reordered is still identical to itself
    ai_shuffled = reordered(case.ai_seg, list(reversed(range(int(case.ai_seg.NumberOfFrames)))))
    assert recompute(case.ai_seg, ai_shuffled, study_uid=case.study_uid).dice == {"lesion": 1.0}


def test_multi_label_edit_scores_each_label(tmp_path: Path) -> None:
    case = make_case(tmp_path / "results", "lts", seed=12)
    masks = {name: case.mask(name) for name in LTS.values()}
    left = masks["left_lobe"].copy()
    rows = np.flatnonzero(left.any(axis=(1, 2)))
    left[rows[: len(rows) // 3]] = False  # the reader removed the lowest third
    grown = np.stack([ndimage.binary_dilation(s) for s in masks["vessels"]])
    seg = edited(case, {"left_lobe": left, "right_lobe": masks["right_lobe"],
                        "vessels": grown}, tmp_path)
    result = recompute(case.ai_seg, seg, study_uid=case.study_uid)
    assert result.dice["right_lobe"] == 1.0
    assert result.dice["left_lobe"] == pytest.approx(
        expected_dice(masks["left_lobe"], left), abs=1e-12)
    assert result.dice["vessels"] == pytest.approx(
        expected_dice(masks["vessels"], grown), abs=1e-12)
    assert result.volumes_ml["left_lobe"] == pytest.approx(case.ml(left), rel=1e-9)
    assert result.volumes_ml["vessels"] == pytest.approx(case.ml(grown), rel=1e-9)
    # the frames of the AI SEG map back onto the source images
    back = masks_on_sources(read_seg_frames(case.ai_seg), case.sources)
    assert all(np.array_equal(back[n], masks[n]) for n in LTS.values())


@pytest.mark.parametrize("kind", ["FRACTIONAL", "LABELMAP"])
def test_fractional_and_label_map_segs_from_other_tools(tmp_path: Path, kind: str) -> None:
    """Another tool's SEG types: FRACTIONAL (counted where >= half the maximum) and the
    newer Label Map SEG (pixel value = segment number, 0 background)."""
    import highdicom as hd

    case = make_case(tmp_path / "results", "lts", seed=12)
    labels = case.labels.copy()
    labels[labels == 3] = 0  # the reader deleted the vessels
    template = build_edited_seg(case.sources, {n: case.mask(n) for n in LTS.values()},
                                case.ai_seg, reader="abdrad_a", uid_key="template")
    descriptions = [hd.seg.SegmentDescription.from_dataset(i) for i in template.SegmentSequence]
    common = dict(source_images=case.sources, segment_descriptions=descriptions,
                  series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(),
                  instance_number=1, manufacturer="other tool", manufacturer_model_name="x",
                  software_versions="1", device_serial_number="1")
    if kind == "FRACTIONAL":
        probs = np.stack([(labels == v).astype(np.float32) * 0.8 for v in (1, 2, 3)], axis=-1)
        probs[..., 0][case.mask("right_lobe")] = 0.3  # below half: not left lobe
        seg = hd.seg.Segmentation(
            pixel_array=probs, segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY, **common)
    else:
        seg = hd.seg.Segmentation(pixel_array=labels.astype(np.uint8),
                                  segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
                                  **common)
    path = _save(seg, tmp_path / f"{kind}.dcm")
    if kind == "FRACTIONAL":  # dicom3tools predates the Label Map SEG IOD (Sup 243)
        assert dciodvfy_errors(path) == []
    result = recompute(case.ai_seg, pydicom.dcmread(path), study_uid=case.study_uid)
    assert result.dice == {"left_lobe": 1.0, "right_lobe": 1.0, "vessels": 0.0}
    assert result.volumes_ml["vessels"] == 0.0
    assert result.volumes_ml["right_lobe"] == pytest.approx(case.ml(case.mask("right_lobe")))


def test_bad_edits_are_refused_with_the_reason(tmp_path: Path) -> None:
    case = make_case(tmp_path / "results")
    other = make_case(tmp_path / "other", seed=6)
    good = edited(case, {"lesion": eroded(case.mask("lesion"))}, tmp_path)
    with pytest.raises(EditRejected, match="belongs to study"):
        recompute(case.ai_seg, edited(other, {"lesion": other.mask("lesion")}, tmp_path,
                                      "other"), study_uid=case.study_uid)
    with pytest.raises(EditRejected, match="not a DICOM Segmentation"):
        recompute(case.ai_seg, case.sources[0], study_uid=case.study_uid)
    broken = copy.deepcopy(good)
    del broken.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0][
        "ImagePositionPatient"]
    with pytest.raises(EditRejected, match="ImagePositionPatient is missing"):
        recompute(case.ai_seg, broken, study_uid=case.study_uid)
    malformed = copy.deepcopy(good)
    del malformed.SegmentSequence[0].SegmentNumber
    with pytest.raises(EditRejected, match="is malformed: AttributeError"):
        recompute(case.ai_seg, malformed, study_uid=case.study_uid)
    renamed = copy.deepcopy(good)
    renamed.SegmentSequence[0].SegmentLabel = "tumour"
    with pytest.raises(EditRejected, match=r"segments \['tumour'\] do not match .*'lesion'"):
        recompute(case.ai_seg, renamed, study_uid=case.study_uid)
    # a SEG over another series (another grid), relabelled and moved into this study
    lts = make_case(tmp_path / "lts", "lts", seed=12)
    prov = Provenance("unit-model", "1.0", "ab" * 32, "bts", "1.0.0", "forged")
    forged = build_seg(lts.sources, (lts.labels == 1).astype(np.uint8), {1: "lesion"}, prov,
                       series_description="forged")
    forged.StudyInstanceUID = case.study_uid
    with pytest.raises(EditRejected, match="references none of the AI result's source"):
        recompute(case.ai_seg, forged, study_uid=case.study_uid)
    del forged.ReferencedSeriesSequence  # and without the source list: the grid differs
    with pytest.raises(EditRejected, match="not on the same grid|pixel spacing"):
        recompute(case.ai_seg, forged, study_uid=case.study_uid)


# --------------------------------------------------------------------------- the consumer


def _completed(case: Case) -> InferenceCompleted:
    return InferenceCompleted.new(
        actor="worker:test", study_uid=case.study_uid, pipeline=case.pipeline,
        run_key=case.run_key, model_name="unit-model", model_version="1.0",
        runtime="onnxruntime-cpu", runtime_reason="test", duration_s=1.0, inference_s=0.5,
        result_keys=(case.result_key,),
        measurements=tuple(Measurement(name=f"volume_{n}", value=round(case.ml(case.mask(n)), 6),
                                       unit="mL", label=n) for n in case.names.values()))


def _submit(store: InstanceStore, case: Case, seg: Dataset, reader: str = "neurorad_a",
            sha256: str | None = None) -> EditSubmitted:
    stored = store.put([_bytes(seg)])
    return EditSubmitted.new(actor=reader, study_uid=case.study_uid, pipeline=case.pipeline,
                             run_key=case.run_key, reader=reader, store_key=stored.store_key,
                             sha256=sha256 or stored.sha256)


class Running:
    def __init__(self, bus: EventBus, recomputer: EditRecomputer) -> None:
        self.bus, self.recomputer, self.stop = bus, recomputer, asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EditRecomputer:
        self.task = asyncio.create_task(self.recomputer.run(self.bus, self.stop))
        return self.recomputer

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 15)


def _config(tmp_path: Path, durable: str = DURABLE) -> EditConfig:
    return EditConfig(instances_dir=tmp_path / "instances", results_dir=tmp_path / "results",
                      worker_id="test-worker", durable=durable, max_attempts=2, ack_wait_s=10)


@pytest.mark.server
async def test_edit_is_recomputed_once_and_reaches_the_read_model(bus: EventBus,
                                                                   tmp_path: Path) -> None:
    case = make_case(tmp_path / "results")
    store = InstanceStore(tmp_path / "instances")
    ai = case.mask("lesion")
    cut = eroded(ai)
    seg = edited(case, {"lesion": cut}, tmp_path)
    completed = _completed(case)
    edit = _submit(store, case, seg)
    await bus.publish(completed)
    await bus.publish(edit)
    await bus.publish(edit)  # a double submit: the same fact, stored once
    async with Running(bus, EditRecomputer(_config(tmp_path))) as first:
        await wait_for(bus, case.study_uid, lambda evs: any(
            isinstance(e, MeasurementRecomputed) for e in evs))
    assert [o.status for o in first.outcomes] == ["recomputed"]
    # the edit delivered again (here: to a second durable, as after a consumer reset)
    async with Running(bus, EditRecomputer(_config(tmp_path, "engine-edits-2"))) as second:
        for _ in range(100):
            if second.outcomes:
                break
            await asyncio.sleep(0.1)
    assert [(o.status, o.edit_event_id) for o in second.outcomes] == [
        ("duplicate", edit.event_id)]
    events = [ev for _, ev in await bus.history(case.study_uid)]
    recomputed = [e for e in events if isinstance(e, MeasurementRecomputed)]
    assert len(recomputed) == 1
    assert sum(isinstance(e, EditSubmitted) for e in events) == 1
    rc = recomputed[0]
    assert rc.edit_event_id == edit.event_id and rc.causation_id == edit.event_id
    assert rc.correlation_id == edit.correlation_id and rc.run_key == case.run_key
    assert rc.actor == "worker:test-worker" and rc.pipeline == "bts"
    want = expected_dice(ai, cut)
    assert rc.dice["lesion"] == pytest.approx(want, abs=1e-6)
    (vol,) = rc.measurements
    assert (vol.name, vol.unit, vol.label) == ("volume_lesion", "mL", "lesion")
    assert vol.value == pytest.approx(case.ml(cut), abs=1e-6)

    # the read model: Dice and edited-vs-AI volume pairs from the existing folds
    ps = ProjectionStore(":memory:")
    try:
        await rebuild(bus, ps)
        with ps.connection() as con:
            (row,) = metrics.dice_summary(con, "bts")
            assert row.label == "lesion" and row.mean.n == 1
            assert row.mean.value == pytest.approx(want, abs=1e-6)
            (agree,) = metrics.volume_agreement(con, "bts")
            assert agree.measurement == "volume_lesion" and agree.pairs == 1
            edited_ml, ai_ml = con.execute(
                "SELECT e.value, a.value FROM measurements e JOIN measurements a "
                "USING (run_key, name) WHERE e.source = 'edit' AND a.source = 'ai'").fetchone()
            assert edited_ml == pytest.approx(case.ml(cut), abs=1e-6)
            assert ai_ml == pytest.approx(case.ml(ai), abs=1e-6)
    finally:
        ps.close()


@pytest.mark.server
async def test_bad_edits_are_dead_lettered_without_a_recomputation(bus: EventBus,
                                                                  tmp_path: Path) -> None:
    case = make_case(tmp_path / "results")
    other = make_case(tmp_path / "results", seed=6)
    store = InstanceStore(tmp_path / "instances")
    await bus.publish(_completed(case))
    wrong_study = _submit(store, case, edited(other, {"lesion": other.mask("lesion")},
                                              tmp_path, "other"))
    altered = _submit(store, case, edited(case, {"lesion": eroded(case.mask("lesion"))},
                                          tmp_path), sha256="0" * 64)
    no_run = EditSubmitted.new(actor="neurorad_b", study_uid=case.study_uid, pipeline="bts",
                               run_key="no-such-run", reader="neurorad_b",
                               store_key=wrong_study.store_key, sha256=wrong_study.sha256)
    for ev in (wrong_study, altered, no_run):
        await bus.publish(ev)
    async with Running(bus, EditRecomputer(_config(tmp_path))):
        events = await wait_for(bus, case.study_uid, lambda evs: sum(
            isinstance(e, DeliveryFailed) for e in evs) >= 3, timeout_s=30)
    dead = {e.original_event_id: e for e in events if isinstance(e, DeliveryFailed)}
    assert not [e for e in events if isinstance(e, MeasurementRecomputed)]
    assert set(dead) == {wrong_study.event_id, altered.event_id, no_run.event_id}
    # a rejected edit is not retried: the same file would be rejected again
    assert all(d.consumer == DURABLE and d.deliveries == 1 for d in dead.values())
    assert "EditRejected" in dead[wrong_study.event_id].reason
    assert f"belongs to study {other.study_uid}" in dead[wrong_study.event_id].reason
    assert "SHA-256" in dead[altered.event_id].reason
    assert "no completed inference with run key no-such-run" in dead[no_run.event_id].reason


@pytest.mark.server
async def test_lastmile_up_runs_the_recompute_beside_the_worker(bus: EventBus,
                                                               tmp_path: Path) -> None:
    """The service `lastmile up` starts reads the settings' result and instance stores."""
    from lastmile.services_engine import EditRecomputeService, engine_services
    from lastmile.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", site_secret="x" * 32, worker_id="w1")
    services = engine_services(settings)
    assert [s.name for s in services] == ["engine-worker", "engine-edits", "pacs-redelivery"]
    service = services[1]
    assert isinstance(service, EditRecomputeService)
    case = make_case(settings.results_dir)
    edit = _submit(InstanceStore(settings.instances_dir), case,
                   edited(case, {"lesion": eroded(case.mask("lesion"))}, tmp_path))
    await bus.publish(_completed(case))
    await bus.publish(edit)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(bus, stop))
    try:
        events = await wait_for(bus, case.study_uid, lambda evs: any(
            isinstance(e, MeasurementRecomputed) for e in evs), timeout_s=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    (rc,) = [e for e in events if isinstance(e, MeasurementRecomputed)]
    assert rc.actor == "worker:w1" and rc.edit_event_id == edit.event_id
