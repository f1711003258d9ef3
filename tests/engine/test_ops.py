"""Pure operators: selection with reasons, preprocessing, MONAI inference, post-processing,
longitudinal comparison."""

from __future__ import annotations

import numpy as np
import pytest

from demo.phantoms import brain_mr_study, pelvis_study, sphere_volume_ml
from engine.errors import ModelOutputError
from engine.ops import inference, postprocess, preprocess, transforms
from engine.ops.longitudinal import EarlierResult, compare
from engine.ops.selection import SelectionRule, describe_series, orientation_of, select_series


def test_selection_picks_the_flair_and_says_why_the_localizer_lost() -> None:
    study = brain_mr_study(1)
    infos = describe_series(study.datasets)
    rule = SelectionRule(modalities=("MR",), description_regex="FLAIR|T2",
                         exclude_regex="LOCALI[SZ]ER", orientation="axial", min_slices=20)
    sel = select_series(infos, rule)
    assert [s.description for s in sel.chosen] == ["AX T2 FLAIR"]
    (uid, reason), = sel.rejected
    assert uid == next(i.series_uid for i in infos if i.description == "LOCALIZER")
    # the attribute is named, its free-text value is not quoted (it may hold anything)
    assert reason == "SeriesDescription (0008,103E) does not match /FLAIR|T2/"


def test_selection_reasons_for_modality_slices_spacing() -> None:
    infos = describe_series(brain_mr_study(2).datasets)
    flair = next(i for i in infos if i.description == "AX T2 FLAIR")
    assert "modality MR not in ['CT']" in select_series([flair], SelectionRule(
        modalities=("CT",))).rejected[0][1]
    assert "40 slices, fewer than 50" in select_series([flair], SelectionRule(
        min_slices=50)).rejected[0][1]
    assert "exceeds 2.0 mm" in select_series([flair], SelectionRule(
        max_spacing_mm=2.0)).rejected[0][1]
    assert "orientation axial is not sagittal" in select_series([flair], SelectionRule(
        orientation="sagittal")).rejected[0][1]


def test_selection_of_radiographs_takes_every_matching_image_series() -> None:
    study = pelvis_study(3, images=5, size=128)
    sel = select_series(describe_series(study.datasets),
                        SelectionRule(modalities=("CR", "DX"), multiple=True))
    assert len(sel.chosen) == 1 and sel.chosen[0].instance_count == 5


def test_orientation_names() -> None:
    assert orientation_of([1, 0, 0, 0, 1, 0]) == "axial"
    assert orientation_of([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert orientation_of([1, 0, 0, 0, 0, -1]) == "coronal"
    assert orientation_of([1, 0, 0, 0, 0.7071, 0.7071]) == "oblique"


def test_resize_2d() -> None:
    img = np.ones((1024, 1024), np.float32)
    assert preprocess.resize_2d(img, (128, 128)).shape == (128, 128)


def _threshold_model(x: np.ndarray) -> dict[str, np.ndarray]:
    """A 'model' whose class-1 logit is the input: foreground where input > 0."""
    return {"logits": np.concatenate([np.zeros_like(x), x * 10.0], axis=1)}


def _inferer(roi: tuple[int, int, int], overlap: float = 0.25) -> object:
    return transforms.build("SlidingWindowInferer", {"roi_size": list(roi), "overlap": overlap,
                                                     "mode": "gaussian", "sw_batch_size": 2})


def test_monai_sliding_window_over_a_runtime_blends_windows_into_the_full_volume() -> None:
    torch = pytest.importorskip("torch")
    vol = -np.ones((1, 40, 70, 50), np.float32)
    vol[0, 10:30, 20:60, 5:45] = 1.0
    calls: list[int] = []
    result = transforms.infer(_inferer((16, 32, 32), 0.5), torch.from_numpy(vol),
                              _threshold_model, classes=2, on_window=calls.append)
    assert tuple(result.probs.shape) == (2, 40, 70, 50)
    labels = postprocess.labels_from_probabilities(result.probs.numpy(),
                                                   activation="softmax")
    assert np.array_equal(labels == 1, vol[0] > 0)
    assert result.windows == calls[-1] > 1 and result.model_s > 0


def test_monai_sliding_window_pads_a_volume_smaller_than_the_roi() -> None:
    torch = pytest.importorskip("torch")
    vol = np.ones((1, 8, 10, 12), np.float32)
    probs = transforms.infer(_inferer((16, 16, 16)), torch.from_numpy(vol), _threshold_model,
                             classes=2).probs
    assert tuple(probs.shape) == (2, 8, 10, 12) and (probs[1] > 0.99).all()


def test_wrong_model_output_shape_is_a_model_output_error() -> None:
    torch = pytest.importorskip("torch")

    def bad(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": np.zeros((x.shape[0], 3, 8, 8, 8), np.float32)}

    with pytest.raises(ModelOutputError, match=r"expected \(1, 2, 16, 16, 16\)"):
        transforms.infer(_inferer((16, 16, 16)), torch.zeros((1, 16, 16, 16)), bad, classes=2)
    with pytest.raises(ModelOutputError, match="output 'boxes' has shape"):
        inference.batches_2d(np.zeros((2, 1, 8, 8)), lambda x: {"boxes": np.zeros((2, 3))},
                             expect={"boxes": (2, 4)})


def test_largest_component_removes_islands_of_listed_labels_only() -> None:
    pytest.importorskip("monai")
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:5, 1:5, 1:5] = 1
    labels[8, 8, 8] = 1  # island
    labels[0, 9, 0] = 3  # other label's island, not listed
    keep = transforms.build("KeepLargestConnectedComponent", {"applied_labels": [1]})
    out = np.asarray(keep(labels[None]))[0]
    assert (out == 1).sum() == 64 and out[8, 8, 8] == 0 and out[0, 9, 0] == 3


def test_window_and_zscore() -> None:
    hu = np.array([-1000, -140, 60, 260, 3000], np.float32)
    assert preprocess.window(hu, center=60, width=400).tolist() == [0, 0, 0.5, 1, 1]
    z = preprocess.zscore(np.array([0, 10, 20, 30], np.float32))
    assert z[0] == 0 and z[1:].mean() == pytest.approx(0, abs=1e-6)


def test_volumes_in_ml_from_voxel_counts_and_spacing() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:5, :4, :2] = 1  # 40 voxels
    labels[9, 9, 9] = 2
    v = postprocess.volumes_ml(labels, (2.0, 0.5, 0.5), {1: "a", 2: "b", 3: "c"})
    assert v == {"a": pytest.approx(0.02), "b": pytest.approx(0.0005), "c": 0.0}


def test_phantom_lesion_volume_matches_the_sphere() -> None:
    study = brain_mr_study(7, lesion_radius_mm=18.0)
    vol = postprocess.volumes_ml(study.labels, study.spacing, {1: "lesion"})["lesion"]
    assert vol == pytest.approx(sphere_volume_ml(18.0), rel=0.05)


def test_detections_scale_boxes_and_give_probabilities() -> None:
    boxes = np.array([[0.5, 0.25, 0.1, 0.75], [0.6, 0.1, 0.9, 0.3]], np.float32)
    logits = np.array([[0, 5, 0], [3, 0, 0]], np.float32)
    dets = postprocess.detections(boxes, logits, region_labels=("right", "left"),
                                  classes=("normal", "fracture", "hardware"),
                                  image_shape=(200, 100))
    assert dets[0].box == pytest.approx((10.0, 50.0, 50.0, 150.0))  # corners sorted
    assert dets[0].classification == "fracture" and dets[0].probability > 0.98
    assert sum(dets[1].probabilities.values()) == pytest.approx(1.0)


def test_longitudinal_change_from_baseline_and_prior() -> None:
    earlier = [EarlierResult("s1", "20250101", 10.0), EarlierResult("s2", "20250601", 12.0),
               EarlierResult("s9", "20270101", 1.0)]  # later than current: ignored
    c = compare(15.0, "20260101", earlier, threshold_pct=25.0)
    assert c.baseline and c.baseline.study_uid == "s1"
    assert c.prior and c.prior.study_uid == "s2"
    assert c.change_from_baseline_pct == pytest.approx(50.0)
    assert c.change_from_prior_pct == pytest.approx(25.0)
    assert c.progression is True
    assert compare(12.5, "20260101", earlier, threshold_pct=30.0).progression is False
    assert compare(5.0, "20240101", earlier, threshold_pct=25.0).progression is None


def test_dice() -> None:
    a = np.zeros(10, bool)
    a[:4] = True
    b = np.zeros(10, bool)
    b[2:6] = True
    assert postprocess.dice(a, b) == pytest.approx(0.5)
    assert postprocess.dice(np.zeros(3), np.zeros(3)) == 1.0
