"""MONAI as the operator vocabulary: the reference pipelines give today's masks, parameters
are checked against MONAI's own signatures at load (file, line, key), and a mask made on
the model's grid lands on the right source voxels for oblique, anisotropic and flipped
series (MONAI's invertible transforms)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from demo.phantoms import abdomen_ct_study, brain_mr_study
from engine.dicom_results import Provenance
from engine.errors import SpecError
from engine.ops.postprocess import dice
from engine.runtimes import TorchRuntime, load_runtime, model_format, probe_host, select_runtime
from engine.spec import REFERENCE_DIR, LoadedPipeline, load_pipeline, parse_pipeline
from engine.steps import OPERATORS, RunContext, run_steps

#: the masks of the reference pipelines on these phantoms, made by the hand-written
#: operators (resample/normalize/sliding_window/largest_component, since removed) at
#: main ef801aa
REFERENCE_MASKS = Path(__file__).resolve().parents[1] / "fixtures" / "engine_reference_masks.npz"


def run(pipeline: LoadedPipeline, datasets: list[Dataset], runtime: object = None
        ) -> RunContext:
    if runtime is None:
        runtime = load_runtime(select_runtime(pipeline.spec.runtime, probe_host(),
                                              model_format(pipeline.model_path)),
                               pipeline.model_path, pipeline.spec.model.sha256)
    ctx = RunContext(pipeline=pipeline, runtime=runtime,  # type: ignore[arg-type]
                     datasets=datasets,
                     provenance=Provenance("m", "1", "ab" * 32, pipeline.name, "1", "rk"))
    run_steps(ctx)
    return ctx


@pytest.mark.slow
@pytest.mark.parametrize(("name", "make", "seed"), [
    ("bts", brain_mr_study, 11), ("bts", brain_mr_study, 12),
    ("lts", abdomen_ct_study, 21), ("lts", abdomen_ct_study, 22)])
def test_reference_pipelines_on_monai_give_todays_masks(name: str, make: object, seed: int
                                                         ) -> None:
    loaded = load_pipeline(REFERENCE_DIR / f"{name}.yaml")
    ops = [o.op for o in loaded.spec.operators]
    assert "SlidingWindowInferer" in ops and "Invert" in ops  # MONAI's, not ours
    ctx = run(loaded, make(seed).datasets)  # type: ignore[operator]
    before = np.load(REFERENCE_MASKS)[f"{name}_{seed}"]
    assert ctx.labels is not None and ctx.labels.shape == before.shape
    for value in loaded.spec.model.labels:
        assert (before == value).any()
        assert dice(ctx.labels == value, before == value) >= 0.999, value


def _errors(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_pipeline(text, REFERENCE_DIR / "x.yaml")
    return str(info.value)


def test_monai_parameters_are_checked_against_monai_with_line_and_key() -> None:
    text = (REFERENCE_DIR / "lts.yaml").read_text()
    lines = text.splitlines()
    bad = text.replace("params: {axcodes: SPL}", "params: {axcodez: SPL}")
    line = next(i for i, t in enumerate(lines, 1) if "axcodes: SPL" in t)
    msg = _errors(bad)
    assert f"x.yaml:{line}: operators.2.params.axcodez: unknown parameter of MONAI " \
           "Orientation; it takes " in msg and "axcodes" in msg
    missing = text.replace("a_min: -140, ", "")
    line = next(i for i, t in enumerate(lines, 1) if "a_min: -140" in t)
    assert f"x.yaml:{line}: operators.3.params.a_min: MONAI ScaleIntensityRange needs " \
           "'a_min'" in _errors(missing)
    callable_ = text.replace("  - op: argmax\n", "  - op: CropForeground\n"
                             "    params: {select_fn: is_positive}\n  - op: argmax\n")
    assert "operators.6.params.select_fn: MONAI CropForeground's 'select_fn' is not set " \
           "by a pipeline file" in _errors(callable_)


def test_a_pipeline_with_monai_operators_loads_without_running_anything() -> None:
    loaded = load_pipeline(REFERENCE_DIR / "bts.yaml")
    by_op = dict(zip([o.op for o in loaded.spec.operators], loaded.operator_params,
                     strict=True))
    assert by_op["NormalizeIntensity"].kwargs == {"nonzero": True}  # type: ignore[attr-defined]
    assert by_op["SlidingWindowInferer"].extra == {"classes": 2}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("removed", "params", "instead"), [
    ("resample", "{spacing: [3, 1, 1]}", "MONAI's Spacing"),
    ("sliding_window", "{roi: [32, 64, 64], classes: 2}", "MONAI's SlidingWindowInferer"),
    ("restore_grid", None, "MONAI's Invert"),
    ("largest_component", "{labels: [1]}", "MONAI's KeepLargestConnectedComponent"),
    ("resize_3d", "{shape: [8, 16, 16]}", "MONAI's Resize"),
    ("normalize", "{method: zscore}", "MONAI's NormalizeIntensity"),
])
def test_a_file_naming_a_removed_operator_is_told_the_monai_one(
    removed: str, params: str | None, instead: str
) -> None:
    """The hand-written volume operators are gone (one piece of code per idea): a file
    that still names one is refused at load with its line and key and MONAI's operator."""
    text = (REFERENCE_DIR / "bts.yaml").read_text()
    old = "  - op: Invert  # back onto the source series' grid\n"
    new = f"  - op: {removed}\n" + (f"    params: {params}\n" if params else "")
    bad = text.replace(old, new)
    line = next(i for i, t in enumerate(bad.splitlines(), 1) if t == f"  - op: {removed}")
    msg = _errors(bad)
    assert f"x.yaml:{line}: operators.5.op: " in msg and instead in msg, msg
    assert "unknown parameter" not in msg  # the operator is named, not its old params
    assert removed not in OPERATORS or removed == "normalize"  # kept for radiographs only


# --------------------------------------------------------------------------- geometry


class _Threshold(torch.nn.Module):
    """A 'model' whose answer is known: foreground where the scaled intensity > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20.0


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


CENTRE = np.array([14.0, -9.0, 21.0])  # LPS mm, off the grid's centre on every axis
RADIUS = 16.0


def _series(template: Dataset, shape: tuple[int, int, int], spacing: tuple[float, float, float],
            row: np.ndarray, col: np.ndarray, *, reverse: bool
            ) -> tuple[list[Dataset], np.ndarray]:
    """A sphere of RADIUS mm at CENTRE written as single-frame MR instances with the given
    geometry (PS3.3 C.7.6.2.1.1), and its truth mask in the loader's slice order."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    normal = np.cross(row, col)
    origin = CENTRE - (row * dx * nx / 2 + col * dy * ny / 2 + normal * dz * nz / 2) \
        + np.array([3.0, -2.0, 5.0])
    j, i = np.mgrid[0:ny, 0:nx]
    series_uid = generate_uid()
    out, truth = [], []
    for k in range(nz):
        ipp = origin + normal * dz * k
        world = ipp + i[..., None] * dx * row + j[..., None] * dy * col
        inside = np.linalg.norm(world - CENTRE, axis=-1) < RADIUS
        truth.append(inside)
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = ny, nx
        ds.PixelData = np.where(inside, 1000, 100).astype(np.uint16).tobytes()
        out.append(ds)
    if reverse:  # files in descending position: the loader orders them along the normal
        out.reverse()
    return out, np.stack(truth)


GEOMETRIES = {
    "oblique": ((40, 56, 64), (2.0, 1.5, 1.5),
                _rotation((1, 1, 0), 25.0) @ np.array([1.0, 0, 0]),
                _rotation((1, 1, 0), 25.0) @ np.array([0, 1.0, 0]), False),
    "anisotropic": ((16, 80, 60), (5.0, 0.8, 1.2), np.array([1.0, 0, 0]),
                    np.array([0, 1.0, 0]), False),
    "flipped": ((36, 50, 48), (2.5, 1.7, 1.4), np.array([-1.0, 0, 0]),
                np.array([0, 0, -1.0]), True),  # coronal, rows and columns reversed
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_a_mask_made_on_the_models_grid_lands_on_the_right_source_voxels(
        geometry: str, tmp_path: Path) -> None:
    shape, spacing, row, col, reverse = GEOMETRIES[geometry]
    template = brain_mr_study(3, extra_localizer=False).datasets[0]
    datasets, truth = _series(template, shape, spacing, row, col, reverse=reverse)
    model = tmp_path / "threshold.ts"
    torch.jit.script(_Threshold()).save(str(model))
    text = (REFERENCE_DIR / "bts.yaml").read_text()
    data = yaml.safe_load(text)
    data["selection"] = {"modalities": ["MR"]}
    data["input"] = {}
    data["operators"] = [
        {"op": "select_series"}, {"op": "load_volume"},
        {"op": "Orientation", "params": {"axcodes": "RAS"}},
        {"op": "Spacing", "params": {"pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"}},
        {"op": "ScaleIntensityRange", "params": {"a_min": 0, "a_max": 1000}},
        {"op": "SlidingWindowInferer", "params": {"roi_size": [32, 32, 32], "overlap": 0.25,
                                                  "classes": 2}},
        {"op": "Invert"}, {"op": "argmax"}, {"op": "volumes"}]
    data["model"] = {"name": "threshold", "version": "1", "path": str(model),
                     "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                     "labels": {1: "sphere"},
                     "output": {"values": "logits", "activation": "softmax"}}
    data["runtime"] = "torch"
    path = tmp_path / "geometry.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_pipeline(path)
    ctx = run(loaded, datasets, TorchRuntime.load(model, device="cpu"))
    # the model really worked on another grid: 2 mm voxels, axes closest to R, A, S
    # (Orientation reorders axes; an oblique series keeps its rotation, as in MONAI)
    affine = ctx.pred.affine.numpy()
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 2.0)
    assert (np.argmax(np.abs(affine[:3, :3]), axis=0) == [0, 1, 2]).all()
    assert (np.diag(affine)[:3] > 0).all()
    assert ctx.labels is not None and ctx.labels.shape == truth.shape
    got = ctx.labels == 1
    assert dice(got, truth) >= 0.93, dice(got, truth)
    # centroids agree to a fraction of a voxel on every axis of the source grid
    assert np.allclose(np.argwhere(got).mean(0), np.argwhere(truth).mean(0), atol=0.35)
    ml = next(m.value for m in ctx.measurements if m.name == "volume_sphere")
    assert abs(ml - 4 / 3 * np.pi * RADIUS ** 3 / 1000) / ml < 0.06
