"""Issue 16 items 4-6: the model's output declared in the pipeline file (logits or
probabilities, softmax or sigmoid, one channel or several, thresholds per label), the
classification task (2D and 3D) with its TID 1500 SR, and codes from the file.

Models here are real ONNX files built by hand (``onnx.helper``), run by ONNX Runtime
through the pipeline's own operators; results are checked with dciodvfy.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pydicom
import pytest
import yaml
from onnx import TensorProto, helper
from scipy import ndimage

from demo.phantoms import brain_mr_study
from engine.dicom_results import Provenance, build_seg
from engine.errors import ModelOutputError, SpecError
from engine.ops import inference, postprocess
from engine.ops.volume import series_to_volume
from engine.runtimes import load_runtime, probe_host, select_runtime
from engine.spec import REFERENCE_DIR, LoadedPipeline, load_pipeline, parse_pipeline
from engine.steps import RunContext, run_steps
from tests.engine.conftest import dciodvfy_errors

PROV = Provenance("unit-model", "1", "cd" * 32, "unit", "1.0.0", "run-output")


# --------------------------------------------------------------------------- pure functions


def test_declared_probabilities_get_no_second_softmax() -> None:
    p = np.array([[0.7, 0.2, 0.1]], np.float32)
    assert np.allclose(inference.to_probabilities(p, values="probabilities"), p)
    # what the engine did before: a softmax over probabilities flattens them
    assert not np.allclose(inference.softmax(p), p)
    logits = np.log(p)
    assert np.allclose(inference.to_probabilities(logits, values="logits"), p, atol=1e-6)


def test_logits_declared_as_probabilities_are_refused_with_the_reason() -> None:
    with pytest.raises(ModelOutputError, match="declares probabilities"):
        inference.to_probabilities(np.array([[3.0, -2.0]]), values="probabilities")


def test_sigmoid_is_element_wise_and_stable() -> None:
    x = np.array([-1000.0, -1.0, 0.0, 1.0, 1000.0])
    out = inference.sigmoid(x)
    assert np.allclose(out, [0.0, 1 / (1 + np.e), 0.5, 1 / (1 + np.exp(-1)), 1.0])
    assert np.all(np.isfinite(out))


def test_labels_from_one_sigmoid_channel_and_per_label_thresholds() -> None:
    p = np.array([[0.2, 0.55, 0.9]], np.float32)  # one channel = label 1
    labels = postprocess.labels_from_probabilities(p, activation="sigmoid")
    assert labels.tolist() == [0, 1, 1]
    strict = postprocess.labels_from_probabilities(p, activation="sigmoid",
                                                   thresholds={1: 0.6})
    assert strict.tolist() == [0, 0, 1]
    two = np.array([[0.7, 0.7, 0.1], [0.8, 0.3, 0.2]], np.float32)  # labels 1 and 2
    out = postprocess.labels_from_probabilities(two, activation="sigmoid",
                                                thresholds={2: 0.75})
    assert out.tolist() == [2, 1, 0]  # both pass: the more probable; 2 needs 0.75


def test_softmax_label_threshold_sends_unsure_voxels_to_background() -> None:
    p = np.array([[0.2, 0.45], [0.8, 0.55]], np.float32)
    assert postprocess.labels_from_probabilities(p, activation="softmax").tolist() == [1, 1]
    out = postprocess.labels_from_probabilities(p, activation="softmax", thresholds={1: 0.6})
    assert out.tolist() == [1, 0]


def test_classification_decisions_softmax_binary_sigmoid_and_multi_label() -> None:
    classes = ("a", "b", "c")
    (c,) = postprocess.classify(np.array([0.5, 0.3, 0.2]), finding="f", classes=classes,
                                activation="softmax")
    assert c.decision == "a" and c.probability == pytest.approx(0.5)
    (c,) = postprocess.classify(np.array([0.5, 0.3, 0.2]), finding="f", classes=classes,
                                activation="softmax", thresholds={"a": 0.6, "b": 0.25})
    assert c.decision == "b"  # a misses its threshold, b reaches its own
    (c,) = postprocess.classify(np.array([0.5, 0.3, 0.2]), finding="f", classes=classes,
                                activation="softmax", thresholds={"a": 0.6, "b": 0.4,
                                                                  "c": 0.4}, otherwise="c")
    assert c.decision == "c"
    (c,) = postprocess.classify(np.array([0.4]), finding="f", classes=("no", "yes"),
                                activation="sigmoid")
    assert (c.decision, c.probabilities["yes"]) == ("no", pytest.approx(0.4))
    (c,) = postprocess.classify(np.array([0.4]), finding="f", classes=("no", "yes"),
                                activation="sigmoid", thresholds={"yes": 0.3})
    assert c.decision == "yes"
    many = postprocess.classify(np.array([0.9, 0.2]), finding="f", classes=("x", "y"),
                                activation="sigmoid")
    assert [(m.finding, m.decision) for m in many] == [("x", "present"), ("y", "absent")]
    with pytest.raises(ModelOutputError, match="3 channels for 2 classes"):
        postprocess.classify(np.zeros(3), finding="f", classes=("x", "y"),
                             activation="softmax")


# --------------------------------------------------------------------------- the file


def _bts() -> dict[str, Any]:
    return yaml.safe_load((REFERENCE_DIR / "bts.yaml").read_text())


def _parse(data: dict[str, Any], path: Path) -> LoadedPipeline:
    text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return parse_pipeline(text, path)


def _refused(data: dict[str, Any], path: Path) -> str:
    with pytest.raises(SpecError) as info:
        _parse(data, path)
    return str(info.value)


LOGITS = {"values": "logits", "activation": "softmax"}


def test_contradictions_in_the_declared_output_name_file_line_and_key(tmp_path: Path) -> None:
    data = _bts()
    data["model"]["path"] = str(REFERENCE_DIR.parent / "models" / "bts.onnx")
    data["model"]["card"] = None
    data["model"]["output"] = {"values": "logits", "activation": "softmax", "channels": 1}
    msg = _refused(data, tmp_path / "one.yaml")
    assert re.search(r"one\.yaml:\d+: model\.output: .*one output channel needs activation: "
                     "sigmoid", msg), msg
    data["model"]["output"] = {"values": "logits", "activation": "sigmoid"}  # argmax: sigmoid
    msg = _refused(data, tmp_path / "sig.yaml")
    assert re.search(r"sig\.yaml:\d+: operators\.6\.op: argmax needs softmax outputs", msg), msg
    data["model"]["output"] = {**LOGITS, "thresholds": {"tumour": 0.5}}
    msg = _refused(data, tmp_path / "thr.yaml")
    assert "neither labels nor classes" in msg and "tumour" in msg
    data["model"]["output"] = {**LOGITS, "channels": 3}
    msg = _refused(data, tmp_path / "ch.yaml")
    assert "2 channels, but model.output.channels is 3" in msg
    data["model"]["output"] = LOGITS  # spec_version 2: declared, never guessed
    data["codes"] = {"lesion": {"value": "1", "scheme": "MYCODES", "meaning": "x"}}
    msg = _refused(data, tmp_path / "code.yaml")
    assert "codes.lesion.scheme" in msg and "private (starting with 99" in msg


def _model(tmp_path: Path, name: str, graph: onnx.GraphProto) -> tuple[Path, str]:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _run(loaded: LoadedPipeline, datasets: list[pydicom.Dataset]) -> RunContext:
    choice = select_runtime("onnxruntime-cpu", probe_host())
    runtime = load_runtime(choice, loaded.model_path, loaded.spec.model.sha256)
    ctx = RunContext(pipeline=loaded, runtime=runtime, datasets=datasets, provenance=PROV)
    run_steps(ctx)
    return ctx


def test_a_one_channel_sigmoid_segmentation_deploys_by_its_file(tmp_path: Path) -> None:
    """One output channel of logits 10 * (x - 0.5): sigmoid, label 1 where it reaches
    the file's threshold. Before: ``classes`` had to be >= 2 and a softmax was applied."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 32, 64, 64])
    y = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["n", 1, 32, 64, 64])
    consts = [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
              helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])]
    nodes = [helper.make_node("Sub", ["image", "half"], ["c"]),
             helper.make_node("Mul", ["c", "ten"], ["mask"])]
    path, sha = _model(tmp_path, "one", helper.make_graph(nodes, "one", [x], [y], consts))
    data = _bts()
    data["name"], data["ae_title"] = "spot", "LM_SPOT"
    data["operators"] = [
        {"op": "select_series"}, {"op": "load_volume"},
        {"op": "Orientation", "params": {"axcodes": "SPL"}},
        {"op": "ScaleIntensityRange", "params": {"a_min": 600, "a_max": 700, "b_min": 0.0,
                                                 "b_max": 1.0, "clip": True}},
        {"op": "SlidingWindowInferer", "params": {"roi_size": [32, 64, 64], "sw_batch_size": 2,
                                                  "overlap": 0.25, "mode": "gaussian",
                                                  "classes": 1}},
        {"op": "Invert"}, {"op": "threshold"}, {"op": "volumes"}, {"op": "write_seg"},
        {"op": "write_sr"}]
    data["model"] = {"name": "spot", "version": "1", "path": str(path), "sha256": sha,
                     "labels": {1: "spot"},
                     "output": {"values": "logits", "activation": "sigmoid", "channels": 1,
                                "thresholds": {"spot": 0.9}}}
    data["codes"] = {"spot": {"value": "LM-SPOT", "scheme": "99MINE", "meaning": "Spot",
                              "category": {"value": "49755003", "scheme": "SCT",
                                           "meaning": "Morphologically Abnormal Structure"}}}
    loaded = _parse(data, tmp_path / "spot.yaml")
    study = brain_mr_study(1601, lesion_radius_mm=16.0)
    ctx = _run(loaded, study.datasets)
    assert ctx.probs is not None and ctx.probs.shape[0] == 1
    vol = ctx.require_volume()
    normalised = np.clip((vol.array - 600) / 100, 0, 1)
    expected = inference.sigmoid(10 * (normalised - 0.5)) >= 0.9  # the file's threshold
    assert ctx.labels is not None
    assert abs(int((ctx.labels == 1).sum()) - int(expected.sum())) <= 0.01 * expected.sum()
    assert expected.sum() > 0
    seg = next(ds for kind, ds in ctx.results if kind == "SEG")
    desc = seg.SegmentSequence[0]
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "LM-SPOT"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert {i.CodingSchemeDesignator for i in seg.CodingSchemeIdentificationSequence} >= \
        {"99MINE", "99LM"}


def _classifier_graph(shape: list[Any], softmax: bool) -> onnx.GraphProto:
    """Three class scores from the image's mean m: (m, 1 - m, 0.5), softmax or raw."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])
    axes = list(range(1, len(shape)))
    consts = [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
              helper.make_tensor("half", TensorProto.FLOAT, [1, 1], [0.5]),
              helper.make_tensor("flat", TensorProto.INT64, [2], [0, 1])]
    nodes = [helper.make_node("ReduceMean", ["image"], ["m4"], axes=axes, keepdims=1),
             helper.make_node("Reshape", ["m4", "flat"], ["m"]),
             helper.make_node("Sub", ["one", "m"], ["inv"]),
             helper.make_node("Mul", ["m", "half"], ["zero_ish"]),
             helper.make_node("Sub", ["half", "zero_ish"], ["h0"]),
             helper.make_node("Add", ["h0", "zero_ish"], ["h"]),
             helper.make_node("Concat", ["m", "inv", "h"], ["raw"], axis=1)]
    nodes.append(helper.make_node("Softmax", ["raw"], ["scores"], axis=1) if softmax
                 else helper.make_node("Identity", ["raw"], ["scores"]))
    return helper.make_graph(nodes, "cls", [x], [y], consts)


def _classifier_file(tmp_path: Path, task: str, values: str, path: Path, sha: str
                     ) -> dict[str, Any]:
    image_ops = [{"op": "load_images"},
                 {"op": "render_8bit", "params": {"method": "window", "center": 600,
                                                  "width": 400}},
                 {"op": "resize_2d", "params": {"size": [32, 32], "interpolation": "bilinear"}},
                 {"op": "normalize", "params": {"method": "range", "low": 0, "high": 255}},
                 {"op": "batch_2d", "params": {"batch": 4, "layout": "nhwc", "channels": 3}}]
    volume_ops = [{"op": "load_volume"},
                  {"op": "Orientation", "params": {"axcodes": "SPL"}},
                  {"op": "ScaleIntensityRange", "params": {"a_min": 0, "a_max": 1000,
                                                           "b_min": 0.0, "b_max": 1.0,
                                                           "clip": True}},
                  {"op": "Resize", "params": {"spatial_size": [8, 16, 16],
                                              "mode": "trilinear"}}]
    return {
        "name": "cls", "version": "1", "task": task, "ae_title": "LM_CLS",
        "selection": {"modalities": ["MR"], "description_regex": "FLAIR"},
        "operators": [{"op": "select_series"},
                      *(image_ops if task == "classification2d" else volume_ops),
                      {"op": "classify", "params": {"finding": "brightness"}},
                      {"op": "write_sr"}],
        "model": {"name": "cls", "version": "1", "path": str(path), "sha256": sha,
                  "classes": ["bright", "dark", "middling"],
                  "output": {"values": values, "activation": "softmax"}},
        "codes": {"brightness": {"value": "LM-BRIGHT", "scheme": "99LM",
                                 "meaning": "Brightness",
                                 "site": {"value": "12738006", "scheme": "SCT",
                                          "meaning": "Brain"}},
                  "bright": {"value": "LM-B", "scheme": "99LM", "meaning": "Bright"},
                  "dark": {"value": "LM-D", "scheme": "99LM", "meaning": "Dark"}},
    }


@pytest.mark.parametrize("values", ["probabilities", "logits"])
def test_a_2d_classifier_gives_probabilities_per_slice_and_a_valid_sr(
    tmp_path: Path, values: str
) -> None:
    graph = _classifier_graph(["n", 32, 32, 3], softmax=values == "probabilities")
    path, sha = _model(tmp_path, "cls2d", graph)
    loaded = _parse(_classifier_file(tmp_path, "classification2d", values, path, sha),
                    tmp_path / "cls.yaml")
    study = brain_mr_study(1602)
    ctx = _run(loaded, study.datasets)
    flair = [d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"]
    assert len(ctx.image_classes) == len(flair)
    for source, (c,) in ctx.image_classes:
        from engine.ops.render import resize_pillow, window_8bit
        from engine.ops.volume import radiograph

        u8 = resize_pillow(window_8bit(radiograph(source).array, center=600, width=400),
                           (32, 32), "bilinear")
        m = float(u8.mean() / 255)
        raw = np.array([m, 1 - m, 0.5])
        want = np.exp(raw) / np.exp(raw).sum()  # one softmax: in the model, or ours
        got = [c.probabilities[k] for k in ("bright", "dark", "middling")]
        assert np.allclose(got, want, atol=1e-5)
    path_sr = tmp_path / "sr.dcm"
    (sr,) = [ds for kind, ds in ctx.results if kind == "SR"]
    sr.save_as(path_sr, enforce_file_format=True)
    assert dciodvfy_errors(path_sr) == []
    text = str(pydicom.dcmread(path_sr).ContentSequence)
    decision = ctx.classifications[0].decision
    assert {"bright": "Bright", "dark": "Dark"}.get(decision, decision) in text
    assert "Brightness" in text and "Brain" in text and "middling" in text  # uncoded: 99LM


def test_a_3d_classifier_runs_on_the_resized_volume(tmp_path: Path) -> None:
    path, sha = _model(tmp_path, "cls3d", _classifier_graph(["n", 1, 8, 16, 16], True))
    loaded = _parse(_classifier_file(tmp_path, "classification3d", "probabilities", path,
                                     sha), tmp_path / "cls3.yaml")
    study = brain_mr_study(1603)
    ctx = _run(loaded, study.datasets)
    vol = series_to_volume([d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"])
    # the former resize_3d: linear interpolation on the pixel-area grid (scipy), which
    # MONAI's Resize(mode=trilinear) does the same way (torch, align_corners=False)
    scaled = np.clip(vol.array / 1000, 0, 1)
    m = float(ndimage.zoom(scaled, np.divide((8, 16, 16), scaled.shape), order=1,
                           mode="nearest", grid_mode=True).mean())
    raw = np.array([m, 1 - m, 0.5])
    (c,) = ctx.classifications
    assert np.allclose([c.probabilities[k] for k in ("bright", "dark", "middling")],
                       np.exp(raw) / np.exp(raw).sum(), atol=1e-5)
    (sr,) = [ds for kind, ds in ctx.results if kind == "SR"]
    out = tmp_path / "sr3.dcm"
    sr.save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []


# --------------------------------------------------------------------------- codes


def _sct_dictionary() -> dict[str, set[str]]:
    """pydicom's SNOMED CT concepts: code -> its meanings (lower case; a code can have a
    few, e.g. "Brain" and "Brain structure (body structure)")."""
    from pydicom.sr._concepts_dict import concepts

    out: dict[str, set[str]] = {}
    for entry in concepts["SCT"].values():
        for code, (meaning, _) in entry.items():
            out.setdefault(code, set()).add(meaning.lower())
    return out


@pytest.mark.parametrize("name", ["bts", "lts", "hfd", "examples/detect-tumor"])
def test_reference_codes_are_pydicoms_snomed_and_private_only_where_none_exists(
    name: str,
) -> None:
    loaded = load_pipeline(REFERENCE_DIR / f"{name}.yaml", check_model=False)
    sct = _sct_dictionary()
    meanings = set().union(*sct.values())
    names = set(loaded.spec.model.labels.values()) | set(loaded.spec.model.classes)
    assert names <= set(loaded.spec.codes), "every label and class is coded"
    for code in loaded.spec.codes.values():
        for part in (code, code.category, code.site):
            if part is None:
                continue
            if part.scheme == "SCT":
                assert part.meaning.lower() in sct.get(part.value, set()), part
            else:
                assert part.private and part.meaning.lower() not in meanings, part


def test_segment_codes_come_from_the_file_not_a_table() -> None:
    study = brain_mr_study(1604)
    vol = series_to_volume([d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"])
    bts = load_pipeline(REFERENCE_DIR / "bts.yaml", check_model=False)
    seg = build_seg(vol.sources, study.labels, {1: "lesion"}, PROV, series_description="x",
                    codebook=bts.spec.codes)
    desc = seg.SegmentSequence[0]
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert desc.AnatomicRegionSequence[0].CodeValue == "12738006"
    bare = build_seg(vol.sources, study.labels, {1: "lesion"}, PROV, series_description="x")
    code = bare.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeMeaning) == ("99LM", "lesion")


def test_threshold_operator_on_softmax_can_be_more_sensitive_than_argmax() -> None:
    """A softmax label's threshold below 0.5 takes voxels argmax gives to background."""
    from engine.steps import OPERATORS, ThresholdParams

    bts = load_pipeline(REFERENCE_DIR / "bts.yaml", check_model=False)
    ctx = RunContext(pipeline=bts, runtime=None, datasets=[], provenance=PROV)  # type: ignore[arg-type]
    ctx.probs = np.array([[0.9, 0.65, 0.4], [0.1, 0.35, 0.6]], np.float32)
    OPERATORS["threshold"].fn(ctx, ThresholdParams(threshold=0.3))
    assert ctx.labels is not None and ctx.labels.tolist() == [0, 1, 1]
    OPERATORS["argmax"].fn(ctx, ThresholdParams())
    assert ctx.labels.tolist() == [0, 0, 1]


def test_a_model_inside_a_package_that_is_not_installed_is_named(tmp_path: Path) -> None:
    data = yaml.safe_load((REFERENCE_DIR / "examples" / "detect-tumor.yaml").read_text())
    data["model"]["path"] = "package:no_such_model_package/model.onnx"
    msg = _refused(data, tmp_path / "pkg.yaml")
    assert re.search(r"pkg\.yaml:\d+: model\.path: package 'no_such_model_package' is not "
                     r"installed", msg), msg
