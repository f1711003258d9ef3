"""Issue 17, "a real published 3D segmentation model": deepbet 1.0.2 (PyPI, not ours; its
wheel ships two TorchScript UNets) deployed as a two-model cascade by a file alone
(``engine/pipelines/examples/deepbet.yaml``), on the real de-identified GE 3D T1 series
(192 slices of 512 x 512) of the brain study in the xnat 0.8.1 sdist (issue 2's corpus).

- its brain mask equals the package's own inference (``deepbet.BrainExtraction.run``) on
  the same series (Dice >= 0.98), and the volume it reports is within 2 % of the volume
  the package reports (measured: Dice 0.994, 1657.9 mL against 1650.6 mL);
- the SEG it writes carries that mask and is dciodvfy-clean.

The package is given the series as MONAI's ``PydicomReader`` reads it (a reader that is
not ours), as the NIfTI image its function takes. Both runs are on CPU: about 20 s for
the package and 35 s for the pipeline on this machine (``slow``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from engine.dicom_results import Provenance
from engine.ops.postprocess import dice
from engine.runtimes import TorchRuntime
from engine.spec import REFERENCE_DIR, LoadedPipeline, load_pipeline
from engine.steps import RunContext, run_steps
from tests.corpus import sources
from tests.engine.conftest import dciodvfy_errors

deepbet = pytest.importorskip("deepbet")
nib = pytest.importorskip("nibabel")

PIPELINE = REFERENCE_DIR / "examples" / "deepbet.yaml"


def _t1_series() -> Path:
    """The GE study's 3D T1 series (192 axial slices, 0.49 x 0.49 x 0.8 mm)."""
    root = sources.xnat_files() / "ANONYMIZ" / "scans"
    (series,) = [p for p in root.iterdir() if p.is_dir() and "T1" in p.name]
    return series / "DICOM"


def _theirs(folder: Path) -> tuple[np.ndarray, float]:
    """deepbet's own inference on the series: its mask in the reader's (column, row,
    slice) order, and the volume it reports (its ``tiv``, cm³ = mL)."""
    from monai.transforms import LoadImage

    image = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    nifti = nib.Nifti1Image(np.asarray(image, dtype=np.float32),
                            np.asarray(image.affine, dtype=np.float64))
    _, mask, tiv = deepbet.BrainExtraction(no_gpu=True).run(nifti)
    return np.asarray(mask.dataobj).astype(bool), float(tiv)


def _context(loaded: LoadedPipeline, folder: Path) -> RunContext:
    datasets = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    bbox = loaded.model_paths["bbox"]
    return RunContext(
        pipeline=loaded,
        runtime=TorchRuntime.load(loaded.model_path, device="cpu"),
        runtimes={"bbox": TorchRuntime.load(bbox, device="cpu")},
        datasets=datasets,
        provenance=Provenance(loaded.spec.model.name, loaded.spec.model.version,
                              loaded.spec.model.sha256, loaded.name, loaded.spec.version,
                              "run-deepbet"))


def test_the_file_points_at_the_weights_inside_the_package() -> None:
    from deepbet.utils import DATA_PATH

    loaded = load_pipeline(PIPELINE)  # checks both SHA-256
    assert loaded.model_path == Path(DATA_PATH, "models", "model.pt").resolve()
    assert loaded.model_paths["bbox"] == Path(DATA_PATH, "models", "bbox_model.pt").resolve()


@pytest.mark.slow
def test_brain_mask_equals_the_package_own_inference_on_a_real_t1(tmp_path: Path) -> None:
    folder = _t1_series()
    theirs, their_ml = _theirs(folder)

    ctx = _context(load_pipeline(PIPELINE), folder)
    timings = run_steps(ctx)
    assert [t.operator for t in timings].count("SimpleInferer") == 2  # the cascade ran
    assert ctx.labels is not None
    ours = ctx.labels.transpose(2, 1, 0) == 1  # (slice, row, column) -> the reader's order
    assert ours.shape == theirs.shape
    # a real brain, not an empty or whole-field mask: 1.2 to 2.0 L, a fraction of the field
    assert 1200 < their_ml < 2000 and 0.05 < theirs.mean() < 0.5
    score = dice(ours, theirs)
    assert score >= 0.98, score

    (volume,) = [m for m in ctx.measurements if m.label == "brain" and m.unit == "mL"]
    assert abs(volume.value - their_ml) <= 0.02 * their_ml, (volume.value, their_ml)

    # the SEG sent carries that mask, and is valid
    (seg,) = [ds for kind, ds in ctx.results if kind == "SEG"]
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert int(pydicom.dcmread(path).pixel_array.astype(bool).sum()) == int(ours.sum())
