"""The review pages' DICOM edge on real files: phantom MR slices, the engine's own SEG
writer for the AI mask, corrected SEGs from the engine's edit writer; the mask drawn on
the slice it belongs to, and uploads that are not an acceptable correction refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dashboards.review import render
from dashboards.review.dicom_files import load_volume, validate_edit
from demo.phantoms import brain_mr_study
from engine.dicom_results import Provenance, build_seg
from engine.edits import build_edited_seg
from engine.ops.volume import series_to_volume
from events.errors import EditRejected


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ai_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("seg")
    study = brain_mr_study(5, extra_localizer=False)
    vol = series_to_volume(study.datasets)
    assert study.labels is not None
    prov = Provenance("unit-model", "1.0", "ab" * 32, "bts", "1.0.0", "run-unit")
    seg = build_seg(vol.sources, study.labels, {1: "lesion"}, prov, series_description="AI")
    seg_path = tmp / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    paths = {}
    for ds in vol.sources:
        p = tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths[str(ds.SOPInstanceUID)] = p
    return {"study": study, "sources": vol.sources, "seg": seg_path, "paths": paths,
            "series": str(vol.sources[0].SeriesInstanceUID)}


def test_ai_mask_lands_on_its_slices(ai_case: dict) -> None:
    volume = load_volume(ai_case["paths"], ai_case["seg"])
    truth = ai_case["study"].labels
    assert volume.segment_labels == {1: "lesion"}
    assert volume.mask is not None and volume.mask.shape == truth.shape
    positions = [i.position for i in volume.images]
    assert positions == sorted(positions)
    assert np.array_equal(volume.mask > 0, truth == 1)  # same voxels, same slice order
    k = int(np.argmax((truth == 1).reshape(len(truth), -1).sum(axis=1)))
    png = render.slice_png(volume.images[k].pixels, volume.mask[k], max_px=max(truth.shape[1:]))
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    inside = img[volume.mask[k] > 0]
    outside = img[volume.mask[k] == 0]
    # tinted red inside the mask, grey outside
    assert (inside[:, 0] - inside[:, 2]).mean() > 40
    assert np.abs(outside[:, 0] - outside[:, 2]).mean() < 1


def test_boxes_are_drawn_in_their_class_colour() -> None:
    pixels = np.zeros((400, 400), np.float32)
    pixels[::2] = 100.0
    png = render.boxes_png(pixels, [("right_hip", "fracture", (100, 100, 300, 300))],
                           max_px=400)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert tuple(img[200, 100]) == render.CLASS_COLOURS["fracture"]
    assert tuple(img[50, 50]) in ((0, 0, 0), (255, 255, 255))


def test_a_corrected_seg_of_the_same_study_and_grid_is_accepted(ai_case: dict) -> None:
    ai_seg = pydicom.dcmread(ai_case["seg"])
    mask = ai_case["study"].labels == 1
    mask[::2] = False
    edit = build_edited_seg(ai_case["sources"], {"lesion": mask}, ai_seg, reader="dr.a",
                            uid_key="unit-edit")
    seg = validate_edit(_bytes(edit), ai_seg_path=ai_case["seg"],
                        study_uid=ai_case["study"].study_uid,
                        source_series=[ai_case["series"]])
    assert str(seg.SOPInstanceUID) == str(edit.SOPInstanceUID)


def test_uploads_that_are_not_a_correction_of_this_result_are_refused(ai_case: dict) -> None:
    kw = dict(ai_seg_path=ai_case["seg"], study_uid=ai_case["study"].study_uid,
              source_series=[ai_case["series"]])
    with pytest.raises(EditRejected, match="empty"):
        validate_edit(b"", **kw)
    with pytest.raises(EditRejected, match="not DICOM"):
        validate_edit(b"just some text, not a DICOM file", **kw)
    ct = Path(str(get_testdata_file("CT_small.dcm")))  # a real image, not a segmentation
    with pytest.raises(EditRejected, match="not a DICOM Segmentation"):
        validate_edit(ct.read_bytes(), **kw)
    own = ai_case["seg"].read_bytes()
    with pytest.raises(EditRejected, match="another study"):
        validate_edit(own, **{**kw, "study_uid": "1.2.3.4"})
    with pytest.raises(EditRejected, match="does not reference the series"):
        validate_edit(own, **{**kw, "source_series": ["1.2.3.999"]})
    other = brain_mr_study(6, extra_localizer=False)
    vol = series_to_volume(other.datasets)
    prov = Provenance("unit-model", "1.0", "ab" * 32, "bts", "1.0.0", "run-other")
    assert other.labels is not None
    foreign = build_seg(vol.sources, other.labels, {1: "lesion"}, prov, series_description="x")
    foreign.StudyInstanceUID = ai_case["study"].study_uid  # forged study, other images
    with pytest.raises(EditRejected, match="geometry must match"):
        validate_edit(_bytes(foreign), **{**kw, "source_series": [
            ai_case["series"], str(vol.sources[0].SeriesInstanceUID)]})


def test_colours_follow_label_names_not_segment_numbers(tmp_path: Path) -> None:
    """Blinded reading: a person's SEG that numbers its segments differently from the
    AI's must look the same, or the colours would tell the sources apart."""
    from demo.phantoms import abdomen_ct_study

    study = abdomen_ct_study(11)
    vol = series_to_volume(study.datasets)
    assert study.labels is not None
    names = dict(study.label_names)
    prov = Provenance("unit-model", "1.0", "ab" * 32, "lts", "1.0.0", "run-lts")
    ai = build_seg(vol.sources, study.labels, names, prov, series_description="AI")
    ai_path = tmp_path / "ai.dcm"
    ai.save_as(ai_path, enforce_file_format=True)
    reversed_masks = {name: study.labels == value for value, name in
                      sorted(names.items(), reverse=True)}
    person = build_edited_seg(vol.sources, reversed_masks, pydicom.dcmread(ai_path),
                              reader="expert", uid_key="expert-unit")
    person_path = tmp_path / "person.dcm"
    person.save_as(person_path, enforce_file_format=True)
    assert [s.SegmentLabel for s in person.SegmentSequence] != \
        [s.SegmentLabel for s in ai.SegmentSequence]  # numbered differently
    paths = {}
    for ds in vol.sources:
        p = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths[str(ds.SOPInstanceUID)] = p
    a, b = load_volume(paths, ai_path), load_volume(paths, person_path)
    assert a.segment_labels == b.segment_labels
    assert a.mask is not None and b.mask is not None and a.mask.any()
    assert np.array_equal(a.mask, b.mask)


def test_a_deflate_bomb_is_refused_with_memory_bounded(tmp_path: Path) -> None:
    """1 MB on disk, 1 GiB once inflated (issue 18, item 13): refused after inflating
    just past the limit, with a few hundred KiB of memory, before pydicom reads it."""
    import tracemalloc

    from dashboards.review.dicom_files import MAX_EDIT_MB, check_inflation
    from tests.review.conftest import deflate_bomb

    bomb = deflate_bomb(pydicom.dcmread(get_testdata_file("SC_rgb_small_odd.dcm")),
                        tmp_path / "bomb.dcm").read_bytes()
    assert len(bomb) < 2 * 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(EditRejected, match=f"inflates to more than {MAX_EDIT_MB} MB"):
            check_inflation(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak
    small = deflate_bomb(pydicom.dcmread(get_testdata_file("SC_rgb_small_odd.dcm")),
                         tmp_path / "small.dcm", inflated_mib=1).read_bytes()
    check_inflation(small)  # a deflated file under the limit passes
