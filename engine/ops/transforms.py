"""MONAI as the operator vocabulary: a pipeline file names MONAI transforms and inferers
with their documented parameters; this module validates and builds them, turns a
``Volume`` into the ``MetaTensor`` MONAI's own loaders would give, and maps results back
onto the source grid with MONAI's invertible transforms.

Conventions (what a MONAI user's training code sees after ``LoadImage``):

- the image is channel-first ``(1, I, J, K)``: column, row, slice index of the DICOM series
  (the ITK order of MONAI's ``ITKReader``/``PydicomReader``), float32 real-world values
  (rescale applied, PS3.3 C.11.1);
- its affine maps voxel indices to RAS world millimetres: DICOM's LPS patient
  coordinates (PS3.3 C.7.6.2.1.1) with the first two axes negated, as MONAI's readers do
  by default (``affine_lps_to_ras=True``).

So ``Orientation(axcodes=RAS)``, ``Spacing(pixdim=...)`` and the rest behave exactly as
in training. ``invert`` undoes every invertible transform applied since the image was
made (``monai.transforms.Compose.inverse`` over the ``MetaTensor``'s
``applied_operations``), then returns to the volume's ``(z, y, x)`` array order.

torch and MONAI are imported inside the functions only: the command line and
ONNX-only 2D pipelines never load them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.ops.inference import to_probabilities

if TYPE_CHECKING:
    from engine.ops.volume import Volume

#: MONAI array transforms a pipeline file may name, by what they act on:
#: ``image`` before inference (the spatial ones are inverted by ``Invert``), ``labels``
#: after it (label maps ``(Z, Y, X)`` on the source grid, as a channel-first tensor).
IMAGE_TRANSFORMS = (
    "Orientation", "Spacing", "Resize", "Zoom", "Flip", "Rotate90",
    "SpatialPad", "DivisiblePad", "BorderPad", "SpatialCrop", "CenterSpatialCrop",
    "CropForeground",
    "ScaleIntensity", "ScaleIntensityRange", "ScaleIntensityRangePercentiles",
    "NormalizeIntensity", "ThresholdIntensity", "ClipIntensityPercentiles",
)
#: the invertible ones among them: what ``Invert`` undoes
SPATIAL_TRANSFORMS = IMAGE_TRANSFORMS[:12]
LABEL_TRANSFORMS = (
    "KeepLargestConnectedComponent", "FillHoles", "RemoveSmallObjects", "LabelFilter",
)
INFERERS = ("SlidingWindowInferer", "SimpleInferer")
#: parameters a file cannot give (callables, devices: the worker decides those)
_NOT_FROM_FILES = {"select_fn", "other", "post_func", "device", "sw_device", "progress",
                   "lazy", "dtype", "return_coords", "with_coord"}


def _kwargs(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(params)
    if name == "Orientation":  # the labels of the image's own space (RAS, set on load)
        kwargs.setdefault("labels", None)
    return kwargs


def _monai_class(name: str) -> Any:
    if name in INFERERS:
        import monai.inferers

        return getattr(monai.inferers, name)
    import monai.transforms

    return getattr(monai.transforms, name)


def parameter_problems(name: str, params: Mapping[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Check ``params`` against MONAI's own signature of ``name``, then build it once.

    Returns ``(location, message)`` pairs (location relative to ``params``: the key at
    fault, or ``()`` for the transform as a whole); empty when MONAI accepts them.
    """
    cls = _monai_class(name)
    sig = inspect.signature(cls)
    accepted = [p for p in sig.parameters.values()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                and p.name not in _NOT_FROM_FILES]
    names = {p.name for p in accepted}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    problems: list[tuple[tuple[Any, ...], str]] = []
    for key in params:
        if key in _NOT_FROM_FILES:
            problems.append(((key,), f"MONAI {name}'s {key!r} is not set by a pipeline file"))
        elif key not in names and not (takes_kwargs and name in ("SpatialPad", "DivisiblePad",
                                                                "BorderPad")):
            problems.append(((key,), f"unknown parameter of MONAI {name}; it takes "
                             + ", ".join(sorted(names))))
    for p in accepted:
        if p.default is p.empty and p.name not in params:
            problems.append(((p.name,), f"MONAI {name} needs {p.name!r}"))
    if problems:
        return problems
    try:
        built = cls(**_kwargs(name, params))
        _dry_run(name, built)
    except Exception as exc:  # noqa: BLE001 - MONAI raises ValueError, TypeError, KeyError...
        said = str(exc)
        named = next((k for k in params if k in said), None)  # the key MONAI's message names
        problems.append(((named,) if named else (), f"MONAI {name} refuses it: "
                         f"{type(exc).__name__}: {said[:200]}"))
    return problems


def _dry_run(name: str, built: Any) -> None:
    """Call ``built`` once on a small blank image, so that what MONAI checks only when
    called (an inferer's overlap, an orientation code) fails at load, not on a patient."""
    import torch
    from monai.data import MetaTensor

    if name in INFERERS:
        roi = getattr(built, "roi_size", (8, 8, 8))
        shape = [int(r) if int(r) > 0 else 8 for r in (roi if len(roi) == 3 else (8, 8, 8))]
        with torch.inference_mode():
            built(torch.zeros((1, 1, *shape)), lambda x: x)
    elif name in IMAGE_TRANSFORMS:
        built(MetaTensor(torch.zeros((1, 8, 8, 8)), affine=torch.eye(4), meta={"space": "RAS"}))
    else:
        built(torch.zeros((1, 8, 8, 8)))


def build(name: str, params: Mapping[str, Any]) -> Any:
    """The MONAI transform or inferer ``name`` built with ``params`` (already checked)."""
    return _monai_class(name)(**_kwargs(name, params))


# --------------------------------------------------------------------------- geometry


def volume_affine(volume: Volume) -> np.ndarray:
    """4x4 affine from the ``(I, J, K)`` = (column, row, slice) index of ``volume`` to
    RAS millimetres (PS3.3 C.7.6.2.1.1, LPS, with x and y negated)."""
    dz, dy, dx = volume.spacing
    lps = np.eye(4)
    lps[:3, 0] = volume.direction[0] * dx  # column index i moves along the row cosine
    lps[:3, 1] = volume.direction[1] * dy  # row index j along the column cosine
    lps[:3, 2] = volume.direction[2] * dz  # slice index k along the normal
    lps[:3, 3] = volume.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def to_image(array: np.ndarray, volume: Volume) -> Any:
    """``(C, Z, Y, X)`` array on ``volume``'s grid -> MONAI ``MetaTensor`` ``(C, I, J, K)``
    with its RAS affine, as MONAI's ``LoadImage`` + ``EnsureChannelFirst`` would give."""
    import torch
    from monai.data import MetaTensor

    data = torch.from_numpy(np.ascontiguousarray(np.transpose(array, (0, 3, 2, 1)),
                                                 dtype=np.float32))
    return MetaTensor(data, affine=torch.from_numpy(volume_affine(volume)),
                      meta={"space": "RAS"})


def to_array(tensor: Any) -> np.ndarray:
    """A MetaTensor or tensor ``(C, I, J, K)`` back to a numpy ``(C, Z, Y, X)`` array."""
    import torch

    data = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    return np.ascontiguousarray(np.transpose(np.asarray(data), (0, 3, 2, 1)))


def apply(transforms: Sequence[Any], image: Any) -> Any:
    """Apply MONAI transforms in order; invertible ones record themselves on the tensor."""
    for t in transforms:
        image = t(image)
    return image


def invert(transforms: Sequence[Any], result: Any, image: Any) -> Any:
    """Undo ``transforms`` (those applied to ``image``) on ``result``: a tensor on
    ``image``'s grid (e.g. class probabilities ``(K, ...)``). Returns a MetaTensor on the
    grid the first transform started from (MONAI's ``Invert``: the image's applied
    operations are copied onto the result, then ``Compose.inverse`` runs)."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, InvertibleTransform

    invertible = [t for t in transforms if isinstance(t, InvertibleTransform)]
    if not invertible:
        return result
    out = MetaTensor(result.as_tensor() if hasattr(result, "as_tensor") else result,
                     meta=dict(image.meta))  # the image's affine and space
    out.applied_operations = list(image.applied_operations)
    return Compose(invertible).inverse(out)


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class InferenceResult:
    probs: Any  # MetaTensor (K, *spatial) on the image's grid: the declared probabilities
    windows: int
    model_s: float  # time inside the model function


def infer(inferer: Any, image: Any, model: Callable[[np.ndarray], dict[str, np.ndarray]],
          *, output: str | None = None, classes: int | None = None,
          on_window: Callable[[int], None] | None = None, values: str = "logits",
          activation: str = "softmax") -> InferenceResult:
    """Run ``model`` (a runtime's ``run``: float32 ``(N, C, ...)`` -> named outputs) on
    ``image`` ``(C, ...)`` through a MONAI inferer; the blended output ``(K, ...)`` becomes
    probabilities as the model's output is declared (``values``, ``activation``:
    ``engine.ops.inference.to_probabilities`` over the classes). Raises
    ``ModelOutputError`` when the output has the wrong shape or does not fit the
    declaration."""
    import time

    import torch

    from engine.errors import ModelOutputError

    calls = [0]
    spent = [0.0]

    def network(x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        outputs = model(x.detach().cpu().numpy().astype(np.float32, copy=False))
        spent[0] += time.perf_counter() - t0
        logits = outputs[output] if output else next(iter(outputs.values()))
        if logits.ndim != x.ndim or logits.shape[0] != x.shape[0] \
                or tuple(logits.shape[2:]) != tuple(x.shape[2:]) \
                or (classes is not None and logits.shape[1] != classes):
            raise ModelOutputError(
                f"model output has shape {tuple(logits.shape)}, expected "
                f"{(x.shape[0], classes or 'K', *x.shape[2:])} (batch, classes, *window)")
        calls[0] += x.shape[0]
        if on_window is not None:
            on_window(calls[0])
        return torch.from_numpy(np.ascontiguousarray(logits, np.float32))

    with torch.inference_mode():
        batch = image.unsqueeze(0) if hasattr(image, "unsqueeze") else image[None]
        out = inferer(batch, network)
        blended = out[0].as_tensor() if hasattr(out, "as_tensor") else out[0]
        probs = torch.from_numpy(np.ascontiguousarray(to_probabilities(
            blended.numpy()[None], values=values, activation=activation, axis=1)[0]))
    from monai.data import MetaTensor

    return InferenceResult(MetaTensor(probs, meta=dict(getattr(image, "meta", {}))),
                           calls[0], spent[0])


# --------------------------------------------------------------------------- cascades


def mask_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[list[int], list[int]]:
    """Bounding box ``(start, end)`` (end exclusive) of ``mask`` ``(Z, Y, X)`` > 0 in the
    image's ``(I, J, K)`` index order, widened by ``margin`` voxels and clipped to the
    grid (MONAI's ``generate_spatial_bounding_box``). Raises ``ValueError`` when the mask
    is empty."""
    from monai.transforms.utils import generate_spatial_bounding_box

    ijk = np.transpose(mask > 0, (2, 1, 0))[None]
    if not ijk.any():
        raise ValueError("the locating model found nothing to crop to")
    start, end = generate_spatial_bounding_box(ijk, margin=margin)
    return ([max(0, int(s)) for s in start],
            [min(int(e), n) for e, n in zip(end, ijk.shape[1:], strict=True)])
