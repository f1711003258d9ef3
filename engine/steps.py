"""The operator registry: what a pipeline file's ``operators:`` list may name.

Each step adapts one pure operator (``engine.ops``) to the run's context: it reads
the values it needs from ``RunContext``, calls the operator, and stores the result.
Parameters are typed models, validated when the pipeline file is loaded, so a typo
fails at deploy time with its line, not at 3 a.m. on a patient's study.

``run_steps`` executes a pipeline's steps in order, timing each; an exception becomes
``OperatorError`` naming the step and the series, with a reason safe to record and the
taxonomy's verdict (``engine.errors``: final for anything a pure step raises on the
input, retried only for edges).

Results are only ever built from valid values and only kept when valid: sources go
through ``engine.result_sources.result_header`` (absent Type 2 attributes added empty,
malformed copied values normalised or left out, SliceThickness from the measured
spacing), and every SEG/SR through ``engine.validation`` (dciodvfy). A SEG that cannot
be written (or is invalid) does not stop the run: the SR is then written with image
references instead of segment references, and the reason is the step's detail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydicom.dataset import Dataset

from engine import dicom_results, validation
from engine.errors import EngineError, InputError, OperatorError, is_retryable, safe_reason
from engine.ops import inference, longitudinal, postprocess, preprocess, render, transforms
from engine.ops.selection import Selection, describe_series, select_series
from engine.ops.volume import Image2D, Volume, radiograph, series_to_volume, voi_image
from engine.result_sources import Repair, result_header

if TYPE_CHECKING:
    from engine.pipeline_model import LoadedPipeline, PipelineSpec
    from engine.runtimes import Runtime


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class MeasurementValue:
    name: str
    value: float
    unit: str
    label: str | None = None


@dataclass
class RunContext:
    """Everything the steps of one run share. Created by the worker, filled by steps."""

    pipeline: LoadedPipeline
    runtime: Runtime
    datasets: list[Dataset]  # every instance of the study, pixel data included
    provenance: dicom_results.Provenance
    study_date: str = ""
    earlier: list[longitudinal.EarlierResult] = field(default_factory=list)
    blinding_hash: str | None = None
    on_progress: Callable[[str], None] | None = None
    # filled as the steps run
    selection: Selection | None = None
    series: list[Dataset] = field(default_factory=list)
    volume: Volume | None = None
    images: list[Image2D] = field(default_factory=list)
    tensor: np.ndarray | None = None  # (C, Z, Y, X) or (N, C, H, W)
    #: MONAI stage: the image as a MetaTensor (engine.ops.transforms conventions), the
    #: MONAI transforms applied to it (inverted by ``Invert``), the model's output on
    #: its grid, and whether ``probs``/``labels`` are still on that grid
    image: Any = None
    applied: list[Any] = field(default_factory=list)
    pred: Any = None
    on_model_grid: bool = False
    #: models of a cascade by name (``models:``); the pipeline's ``model`` is ``runtime``
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    work_spacing: tuple[float, ...] | None = None
    probs: np.ndarray | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None
    measurements: list[MeasurementValue] = field(default_factory=list)
    comparison: longitudinal.Comparison | None = None
    detections: list[tuple[Dataset, postprocess.Detection]] = field(default_factory=list)
    #: classification: per image (2D) its classifications, and the study's decisions
    #: with the images or series they were made on
    image_classes: list[tuple[Dataset, list[postprocess.Classification]]] = field(
        default_factory=list)
    classifications: list[postprocess.Classification] = field(default_factory=list)
    results: list[tuple[str, Dataset]] = field(default_factory=list)  # ("SEG"|"SR", object)
    inference_s: float = 0.0
    #: why no SEG was written (the SR then references the source images), or None
    seg_refused: str | None = None
    #: the source headers the results copy from, repaired (see result_sources)
    headers: list[Dataset] = field(default_factory=list)
    repair: Repair = field(default_factory=Repair)

    def require_volume(self) -> Volume:
        if self.volume is None:
            raise EngineError("no volume: put load_volume before this operator")
        return self.volume

    def require(self, value: np.ndarray | None, what: str, before: str) -> np.ndarray:
        if value is None:
            raise EngineError(f"no {what}: put {before} before this operator")
        return value


StepFn = Callable[[RunContext, BaseModel], str | None]  # returns a short detail line


@dataclass(frozen=True)
class Operator:
    name: str
    params: type[BaseModel]
    fn: StepFn
    tasks: tuple[str, ...] = ("segmentation3d", "detection2d")
    doc: str = ""


ALL_TASKS = ("segmentation3d", "detection2d", "classification2d", "classification3d")
IMAGE_TASKS = ("detection2d", "classification2d")
VOLUME_TASKS = ("segmentation3d", "classification3d")


OPERATORS: dict[str, Operator] = {}

#: the hand-written volume operators that MONAI's replaced (one piece of code per idea),
#: with what a file writes instead; a file naming one is refused at load (``engine.spec``)
REMOVED: dict[str, str] = {
    "resample": "MONAI's Spacing (pixdim: mm per axis of the image, after Orientation "
                "SPL in resample's (slice, row, column) order; mode: bilinear), undone by "
                "Invert",
    "sliding_window": "MONAI's SlidingWindowInferer (roi_size, sw_batch_size, overlap, "
                      "mode: gaussian, and Lastmile's classes and output), then Invert",
    "restore_grid": "MONAI's Invert after the inferer (it undoes every spatial transform)",
    "largest_component": "MONAI's KeepLargestConnectedComponent (applied_labels; "
                         "num_components for keep)",
    "resize_3d": "MONAI's Resize (spatial_size: after Orientation SPL in resize_3d's "
                 "(slice, row, column) order; mode: trilinear for its linear interpolation)",
}


def replaced_operator(name: str, task: str) -> str | None:
    """Why a file of ``task`` cannot name operator ``name`` and the MONAI operator it
    names instead; ``None`` when the name is not one of those replaced."""
    if name in REMOVED:
        return f"operator {name!r} was removed: use {REMOVED[name]}"
    if name == "normalize" and task in VOLUME_TASKS:
        return ("normalize works on radiographs (load_images); on a volume use MONAI's "
                "NormalizeIntensity (zscore: nonzero: true) or ScaleIntensityRange (window "
                "or range: a_min, a_max, b_min: 0, b_max: 1, clip: true)")
    return None


def operator(name: str, params: type[BaseModel] = NoParams,
             tasks: tuple[str, ...] = ("segmentation3d", "detection2d")
             ) -> Callable[[StepFn], StepFn]:
    def register(fn: StepFn) -> StepFn:
        OPERATORS[name] = Operator(name, params, fn, tasks, (fn.__doc__ or "").strip())
        return fn

    return register


# --------------------------------------------------------------------------- selection


@operator("select_series", tasks=ALL_TASKS)
def _select(ctx: RunContext, _: BaseModel) -> str:
    """Choose the input series by the pipeline's selection rules; record why others lost."""
    rule = ctx.pipeline.spec.selection.rule()
    infos = describe_series(ctx.datasets, rule.tags)
    ctx.selection = select_series(infos, rule, ctx.pipeline.spec.input.contract())
    chosen = {s.series_uid for s in ctx.selection.chosen}
    ctx.series = [d for d in ctx.datasets if str(d.SeriesInstanceUID) in chosen]
    return f"{len(chosen)} chosen, {len(ctx.selection.rejected)} rejected"


@operator("load_volume", tasks=VOLUME_TASKS)
def _load_volume(ctx: RunContext, _: BaseModel) -> str:
    """Series -> volume with geometry and rescale (single-frame or enhanced multi-frame)."""
    if not ctx.series:
        raise InputError("no series selected")
    ctx.volume = series_to_volume(ctx.series)
    ctx.tensor = ctx.volume.array[None]
    ctx.work_spacing = ctx.volume.spacing
    return f"{ctx.volume.array.shape} at {tuple(round(s, 3) for s in ctx.volume.spacing)} mm"


@operator("load_images", tasks=IMAGE_TASKS)
def _load_images(ctx: RunContext, _: BaseModel) -> str:
    """Each selected radiograph as an image (MONOCHROME1 inverted, rescale applied)."""
    if not ctx.series:
        raise InputError("no images selected")
    def number(ds: Dataset) -> int:
        try:
            return int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            return 0

    ctx.images = [radiograph(ds) for ds in sorted(ctx.series, key=number)]
    return f"{len(ctx.images)} images"


# --------------------------------------------------------------------------- preprocessing


class NormalizeParams(Params):
    """``zscore``; ``window`` (center/width, e.g. CT HU); ``range`` (fixed low/high:
    only for inputs of one known bit depth); ``image_range`` (each image's own range
    after the Modality LUT, from its Bits Stored and rescale); ``voi`` (each image's
    own VOI LUT or window, PS3.3 C.11.2; ``image_range`` where it has none)."""

    method: Literal["zscore", "window", "range", "image_range", "voi"] = Field(
        description="zscore, window (center/width), range (low/high), image_range (each "
        "image's own range), voi (each image's own VOI LUT or window)")
    center: float | None = Field(None, description=(
        "window: its center, in the image's real-world values (e.g. HU)"))
    width: float | None = Field(None, gt=0, description=(
        "window: its width, in the image's real-world values"))
    low: float | None = Field(None, description="range: the value that becomes 0")
    high: float | None = Field(None, description="range: the value that becomes 1")
    nonzero_only: bool = Field(True, description=(
        "zscore: mean and deviation over voxels != 0 only"))


@operator("normalize", NormalizeParams, tasks=IMAGE_TASKS)
def _normalize(ctx: RunContext, p: BaseModel) -> str:
    """Radiograph intensity normalisation: z-score, window, fixed range, the image's own
    range or its own VOI LUT/window, to [0, 1] (volumes: MONAI's ``NormalizeIntensity``,
    ``ScaleIntensityRange``)."""
    assert isinstance(p, NormalizeParams)
    if p.method in ("image_range", "voi"):
        if not ctx.images or ctx.tensor is not None:
            raise EngineError(f"normalize {p.method} works on images: put it right after "
                              "load_images")
        out, no_voi = [], 0
        for im in ctx.images:
            voi = voi_image(im) if p.method == "voi" else None
            if voi is None:
                no_voi += p.method == "voi"
                arr, lo, hi = im.array, im.low, im.high
            else:
                arr, lo, hi = voi
            out.append(Image2D(preprocess.scale_range(arr, low=lo, high=hi), im.source,
                               0.0, 1.0, im.inverted))
        ctx.images = out
        return p.method + (f" ({no_voi} image(s) without VOI LUT or window: image_range)"
                           if no_voi else "")

    def apply(a: np.ndarray) -> np.ndarray:
        if p.method == "zscore":
            return preprocess.zscore(a, nonzero_only=p.nonzero_only)
        if p.method == "window":
            if p.center is None or p.width is None:
                raise EngineError("normalize window needs center and width")
            return preprocess.window(a, center=p.center, width=p.width)
        if p.low is None or p.high is None or p.high <= p.low:
            raise EngineError("normalize range needs low < high")
        return preprocess.scale_range(a, low=p.low, high=p.high)

    if ctx.images and ctx.tensor is None:
        ctx.images = [Image2D(apply(im.array), im.source, 0.0, 1.0, im.inverted)
                      for im in ctx.images]
    else:
        tensor = ctx.require(ctx.tensor, "tensor", "resize_2d")
        ctx.tensor = apply(tensor)
    return p.method


class Resize2dParams(Params):
    """``size`` (rows, cols) in pixels; ``interpolation``: ``area`` (area averaging, the
    default) or one of Pillow's filters (``nearest``, ``bilinear``, ``bicubic``,
    ``lanczos``, ``box``, ``hamming``: as a package that resizes its picture with
    ``PIL.Image.resize`` does; 8-bit images stay 8-bit, see ``render_8bit``)."""

    size: tuple[int, int] = Field(description="(rows, columns) the model takes",
                                  json_schema_extra={"unit": "pixels"})
    interpolation: Literal["area", "nearest", "bilinear", "bicubic", "lanczos", "box",
                           "hamming"] = Field("area", description=(
        "area averaging, or the Pillow filter of that name"))


@operator("resize_2d", Resize2dParams, tasks=IMAGE_TASKS)
def _resize_2d(ctx: RunContext, p: BaseModel) -> str:
    """Resize each image to the model's input size; stack into (N, 1, H, W)."""
    assert isinstance(p, Resize2dParams)
    if not ctx.images:
        raise EngineError("no images: put load_images before resize_2d")
    if p.interpolation == "area":
        arrays = [preprocess.resize_2d(im.array, p.size) for im in ctx.images]
    else:
        arrays = [render.resize_pillow(im.array, p.size, p.interpolation) for im in ctx.images]
    ctx.tensor = np.stack(arrays).astype(np.float32)[:, None]
    return f"{ctx.tensor.shape} ({p.interpolation})"


class Render8bitParams(Params):
    """``method``: ``window`` (``center``/``width`` in the image's real-world values,
    PS3.3 C.11.2.1.2.1) or ``voi`` (each image's own VOI LUT or window, PS3.3 C.11.2;
    the image's own range where it has none). The result is 0..255 in whole numbers, as
    a picture exported for a model trained on pictures."""

    method: Literal["window", "voi"] = Field("window", description=(
        "window: center/width given here; voi: each image's own VOI LUT or window"))
    center: float | None = Field(None, description=(
        "window: its center, in the image's real-world values"))
    width: float | None = Field(None, ge=1, description=(
        "window: its width, in the image's real-world values"))


@operator("render_8bit", Render8bitParams, tasks=IMAGE_TASKS)
def _render_8bit(ctx: RunContext, p: BaseModel) -> str:
    """Each image rendered to 8 bits (0..255) through a window the file names or the
    image's own VOI LUT/window: the picture a model trained on exported images saw."""
    assert isinstance(p, Render8bitParams)
    if not ctx.images or ctx.tensor is not None:
        raise EngineError("render_8bit works on images: put it right after load_images")
    if p.method == "window" and (p.center is None or p.width is None):
        raise EngineError("render_8bit window needs center and width")
    out = []
    for im in ctx.images:
        if p.method == "window":
            assert p.center is not None and p.width is not None
            u8 = render.window_8bit(im.array, center=p.center, width=p.width)
        else:
            voi = voi_image(im)
            arr, lo, hi = voi if voi is not None else (im.array, im.low, im.high)
            u8 = render.range_8bit(arr, low=lo, high=hi)
        out.append(Image2D(u8, im.source, 0.0, 255.0, im.inverted))
    ctx.images = out
    return (f"window {p.center:g}/{p.width:g}" if p.method == "window"
            and p.center is not None and p.width is not None else p.method)


# --------------------------------------------------------------------------- inference


class Batch2dParams(Params):
    """``layout``: ``nchw`` or ``nhwc`` (channels last); ``channels``: the channels the
    model takes (a grey image is repeated into them, e.g. 3 for RGB); ``expect``: output
    name -> per-image shape, checked."""

    batch: int = Field(8, ge=1, description="images per model call")
    expect: dict[str, tuple[int, ...]] = Field(default_factory=dict, description=(
        "output name -> its shape per image, checked"))
    layout: Literal["nchw", "nhwc"] = Field("nchw", description=(
        "channels first (nchw) or last (nhwc)"))
    channels: int | None = Field(None, ge=1, description=(
        "the channels the model takes (grey repeated into them, e.g. 3 for RGB); "
        "default: 1"))


@operator("batch_2d", Batch2dParams, tasks=IMAGE_TASKS)
def _batch_2d(ctx: RunContext, p: BaseModel) -> str:
    """2D inference in batches; output shapes checked against ``expect``."""
    assert isinstance(p, Batch2dParams)
    tensor = ctx.require(ctx.tensor, "tensor", "resize_2d")
    t0 = time.perf_counter()
    ctx.outputs = inference.batches_2d(tensor, ctx.runtime.run, batch=p.batch, expect=p.expect,
                                       layout=p.layout, channels=p.channels)
    ctx.inference_s += time.perf_counter() - t0
    return f"{len(tensor)} images on {ctx.runtime.name}"


# --------------------------------------------------------------------------- MONAI


def _monai_problem(title: str, problems: list[tuple[tuple[Any, ...], str]],
                   data: object) -> ValidationError:
    return ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("monai", "{reason}", {"reason": msg}),
                         loc=loc, input=data) for loc, msg in problems])


class MonaiParams(BaseModel):
    """The parameters of one MONAI transform or inferer, checked against MONAI's own
    signature (and by building it once) when the pipeline file is loaded
    (``engine.ops.transforms.parameter_problems``). ``own`` names Lastmile's extra keys
    (e.g. which model an inferer runs)."""

    model_config = ConfigDict(frozen=True)
    transform: ClassVar[str] = ""
    own: ClassVar[tuple[str, ...]] = ()
    kwargs: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def check(cls, data: object) -> MonaiParams:
        if not isinstance(data, dict):
            raise _monai_problem(cls.transform, [((), "parameters are a mapping")], data)
        kwargs = {k: v for k, v in data.items() if k not in cls.own}
        problems = transforms.parameter_problems(cls.transform, kwargs)
        if problems:
            raise _monai_problem(cls.transform, problems, data)
        return cls(kwargs=kwargs, extra={k: v for k, v in data.items() if k in cls.own})


def _image(ctx: RunContext) -> Any:
    """The current MONAI image; made from the loaded volume on first use."""
    if ctx.image is None:
        vol = ctx.require_volume()
        ctx.image = transforms.to_image(ctx.require(ctx.tensor, "tensor", "load_volume"), vol)
        ctx.applied = []
    return ctx.image


def _transform_step(name: str, on_labels: bool) -> StepFn:
    """The step of MONAI transform ``name``: on the image (recorded for ``Invert``) or,
    ``on_labels``, on the label map ``(Z, Y, X)`` as a channel-first tensor."""
    def step(ctx: RunContext, p: BaseModel) -> str:
        assert isinstance(p, MonaiParams)
        t = transforms.build(name, p.kwargs)
        if not on_labels:
            ctx.image = t(_image(ctx))
            ctx.applied.append(t)
            return f"{tuple(ctx.image.shape[1:])}"
        labels = ctx.require(ctx.labels, "labels", "argmax or threshold")
        out = t(labels[None])
        ctx.labels = np.asarray(out.cpu().numpy() if hasattr(out, "cpu") else out)[0].astype(
            labels.dtype)
        return f"{int(np.count_nonzero(ctx.labels))} voxels labelled"
    step.__doc__ = (f"MONAI ``{name}`` on the label map." if on_labels else
                    f"MONAI ``{name}`` on the image (spatial ones are undone by ``Invert``).")
    return step


def _inferer_step(name: str) -> StepFn:
    def step(ctx: RunContext, p: BaseModel) -> str:
        assert isinstance(p, MonaiParams)
        model = p.extra.get("model")
        runtime = ctx.runtime if model is None else ctx.runtimes.get(str(model))
        if runtime is None:
            raise EngineError(f"no model {model!r} loaded for this run")

        def progress(done: int) -> None:
            if ctx.on_progress is not None:
                ctx.on_progress(f"window {done}")

        # what the model's output is, as its file declares it (model.output)
        spec = ctx.pipeline.spec
        declared = (spec.model if model is None else spec.models[str(model)]).output
        t0 = time.perf_counter()
        result = transforms.infer(transforms.build(name, p.kwargs), _image(ctx), runtime.run,
                                  output=p.extra.get("output") or declared.name,
                                  classes=p.extra.get("classes"), on_window=progress,
                                  values=declared.values, activation=declared.activation)
        ctx.inference_s += time.perf_counter() - t0
        ctx.pred = result.probs
        ctx.probs = transforms.to_array(result.probs)
        ctx.labels = None
        ctx.on_model_grid = any(getattr(t, "inverse", None) for t in ctx.applied)
        return (f"{result.windows} windows on {runtime.name}"
                + (f" ({model})" if model else "")
                + f", model {result.model_s:.3f} s of {time.perf_counter() - t0:.3f} s")
    step.__doc__ = (f"MONAI ``{name}`` running the model (``model:`` names one of "
                    "``models:`` in a cascade); probabilities as ``model.output`` declares.")
    return step


def _register_monai() -> None:
    # the image transforms also prepare a 3D classifier's input (``classify``)
    for names, make, own, tasks in (
            (transforms.IMAGE_TRANSFORMS, lambda n: _transform_step(n, False), (), VOLUME_TASKS),
            (transforms.LABEL_TRANSFORMS, lambda n: _transform_step(n, True), (),
             ("segmentation3d",)),
            (transforms.INFERERS, _inferer_step, ("model", "output", "classes"),
             ("segmentation3d",))):
        for name in names:
            params = type(f"{name}Params", (MonaiParams,), {"transform": name, "own": own})
            fn = make(name)
            OPERATORS[name] = Operator(name, params, fn, tasks, (fn.__doc__ or "").strip())


_register_monai()


@operator("Invert", tasks=("segmentation3d",))
def _invert(ctx: RunContext, _: BaseModel) -> str:
    """MONAI's inverse of every spatial transform applied to the image, on the model's
    output: class probabilities back on the source series' grid."""
    if ctx.pred is None:
        raise EngineError("no model output: put an inferer before Invert")
    image = _image(ctx)
    restored = transforms.invert(ctx.applied, ctx.pred, image)
    ctx.probs = transforms.to_array(restored)
    ctx.on_model_grid = False
    ctx.work_spacing = ctx.require_volume().spacing
    return f"{ctx.probs.shape[1:]}"


class CropToParams(Params):
    labels: tuple[int, ...] = Field((), description=(
        "which labels of the first model make the box; empty: any"))
    margin: int | tuple[int, int, int] = Field(0, description=(
        "added around the box on the source grid, one or (z, y, x)"),
        json_schema_extra={"unit": "voxels"})


@operator("crop_to_labels", CropToParams, tasks=("segmentation3d",))
def _crop_to(ctx: RunContext, p: BaseModel) -> str:
    """Cascade: crop the source image to the box of the previous model's labels (MONAI
    ``SpatialCrop``, undone by the next ``Invert``); the next steps start from there."""
    assert isinstance(p, CropToParams)
    labels = ctx.require(ctx.labels, "labels", "a first model, Invert and argmax")
    if ctx.on_model_grid:
        raise EngineError("the first model's labels are not on the source grid: put "
                          "Invert before crop_to_labels")
    mask = np.isin(labels, p.labels) if p.labels else labels > 0
    start, end = transforms.mask_box(mask, p.margin)
    ctx.image = None
    crop = transforms.build("SpatialCrop", {"roi_start": start, "roi_end": end})
    ctx.image = crop(_image(ctx))
    ctx.applied = [crop]
    ctx.labels, ctx.probs, ctx.pred = None, None, None
    return f"box {start}..{end}"


# --------------------------------------------------------------------------- post-processing


def _label_thresholds(ctx: RunContext) -> dict[int, float]:
    """``model.output.thresholds`` by label value (the file names labels)."""
    spec = ctx.pipeline.spec.model
    by_name = {name: value for value, name in spec.labels.items()}
    return {by_name[n]: t for n, t in spec.output.thresholds.items() if n in by_name}


@operator("argmax", tasks=("segmentation3d",))
def _argmax(ctx: RunContext, _: BaseModel) -> str:
    """Label map = most probable class per voxel (softmax outputs; a label with a
    threshold in ``model.output.thresholds`` only where it reaches it)."""
    probs = ctx.require(ctx.probs, "probabilities", "an inferer (SlidingWindowInferer)")
    ctx.labels = postprocess.labels_from_probabilities(
        probs, activation="softmax", thresholds=_label_thresholds(ctx))
    return "argmax"


class ThresholdParams(Params):
    """``threshold``: for labels without one in ``model.output.thresholds``."""

    threshold: float = Field(0.5, gt=0, lt=1, description=(
        "probability at or above which a label without its own threshold is decided"))


@operator("threshold", ThresholdParams, tasks=("segmentation3d",))
def _threshold(ctx: RunContext, p: BaseModel) -> str:
    """Label map by thresholds per label (``model.output.thresholds``, else the
    parameter): each label's probability (a sigmoid channel, or a softmax class's)
    against its own; the most probable of those that reach theirs, else background."""
    assert isinstance(p, ThresholdParams)
    probs = ctx.require(ctx.probs, "probabilities", "an inferer (SlidingWindowInferer)")
    activation = ctx.pipeline.spec.model.output.activation
    if activation == "softmax":  # the foreground channels, each against its threshold
        probs = probs[1:]
    ctx.labels = postprocess.labels_from_probabilities(
        probs, activation="sigmoid", thresholds=_label_thresholds(ctx), default=p.threshold)
    return f">= {p.threshold} ({activation})"


@operator("volumes", tasks=("segmentation3d",))
def _volumes(ctx: RunContext, _: BaseModel) -> str:
    """Volume in mL of each model label, on the source grid."""
    labels = ctx.require(ctx.labels, "labels", "argmax or threshold")
    vol = ctx.require_volume()
    if ctx.on_model_grid or labels.shape != vol.array.shape:
        raise EngineError("labels are not on the source grid: put Invert (MONAI) after "
                          "the inferer")
    names = ctx.pipeline.spec.model.labels
    for name, ml in postprocess.volumes_ml(labels, vol.spacing, names).items():
        ctx.measurements.append(MeasurementValue(f"volume_{name}", ml, "mL", name))
    return ", ".join(f"{m.label}={m.value:.2f} mL" for m in ctx.measurements)


class LongitudinalParams(Params):
    label: str = Field(description="the label (model.labels name) whose volume is compared")
    threshold_pct: float = Field(25.0, gt=0, description=(
        "growth from baseline or prior (either) above which it is progression"),
        json_schema_extra={"unit": "%"})


@operator("longitudinal", LongitudinalParams, tasks=("segmentation3d",))
def _longitudinal(ctx: RunContext, p: BaseModel) -> str:
    """% change of a label's volume from baseline and prior exams; progression flag."""
    assert isinstance(p, LongitudinalParams)
    current = next((m for m in ctx.measurements if m.label == p.label and m.unit == "mL"), None)
    if current is None:
        raise EngineError(f"no volume for label {p.label!r}: put volumes before longitudinal")
    ctx.comparison = c = replace(longitudinal.compare(
        current.value, ctx.study_date, ctx.earlier, threshold_pct=p.threshold_pct,
        current_study_uid=str(ctx.datasets[0].StudyInstanceUID) if ctx.datasets else None),
        label=p.label)
    if c.change_from_baseline_pct is not None:
        ctx.measurements.append(MeasurementValue(
            f"change_from_baseline_{p.label}", c.change_from_baseline_pct, "%", p.label))
    if c.change_from_prior_pct is not None:
        ctx.measurements.append(MeasurementValue(
            f"change_from_prior_{p.label}", c.change_from_prior_pct, "%", p.label))
    return "no earlier exam" if c.progression is None else f"progression={c.progression}"


class DetectionsParams(Params):
    """``regions``: the region names in output order; ``classes``: the class names in
    output order; ``finding``: what each region is (its code, from the file's
    ``codes``, is the SR's finding type)."""

    regions: tuple[str, ...] = Field(description="region names in output order")
    classes: tuple[str, ...] = Field(description="class names in output order")
    finding: str | None = Field(None, description=(
        "what each region is (its code in codes: is the SR's finding type)"))
    boxes_output: str = Field("boxes", description=(
        "the model output with a box (x0, y0, x1, y1, 0..1) per region"))
    logits_output: str = Field("logits", description=(
        "the model output with the class scores per region"))


@operator("detections", DetectionsParams, tasks=("detection2d",))
def _detections(ctx: RunContext, p: BaseModel) -> str:
    """Per image: a box per region scaled to source pixels, class probabilities."""
    assert isinstance(p, DetectionsParams)
    boxes, logits = ctx.outputs.get(p.boxes_output), ctx.outputs.get(p.logits_output)
    if boxes is None or logits is None:
        raise EngineError(f"model outputs {p.boxes_output!r}/{p.logits_output!r} missing")
    declared = ctx.pipeline.spec.model.output
    for i, im in enumerate(ctx.images):
        for det in postprocess.detections(boxes[i], logits[i], region_labels=p.regions,
                                          classes=p.classes,
                                          image_shape=im.array.shape,  # type: ignore[arg-type]
                                          values=declared.values,
                                          activation=declared.activation):
            ctx.detections.append((im.source, det))
    return f"{len(ctx.detections)} detections"


# --------------------------------------------------------------------------- classification


class ClassifyParams(Params):
    """``finding``: what is classified (a name; its code in the file's ``codes``).
    ``output``: the model output to read (default ``model.output.name``, else the
    first). ``aggregate`` (2D): how the images' probabilities make the study's:
    ``mean`` or ``max`` per class (then renormalised for softmax outputs)."""

    finding: str = Field(min_length=1, max_length=64, description=(
        "what is classified (a name; its code in codes:)"))
    output: str | None = Field(None, description=(
        "the model output to read (default: model.output.name, else the first)"))
    aggregate: Literal["mean", "max"] = Field("mean", description=(
        "2D: the study's probabilities from its images' (max renormalised for softmax)"))


@operator("classify", ClassifyParams, tasks=("classification2d", "classification3d"))
def _classify(ctx: RunContext, p: BaseModel) -> str:
    """Class probabilities as ``model.output`` declares them (never a second softmax on
    probabilities) and the decision by its thresholds: per image (2D) and for the study.
    A 3D model runs once on the image as MONAI's transforms left it (e.g. ``Resize`` to
    the shape it takes), ``(1, 1, I, J, K)``, like an inferer's input."""
    assert isinstance(p, ClassifyParams)
    model = ctx.pipeline.spec.model
    declared = model.output
    name = p.output or declared.name
    if ctx.pipeline.spec.task == "classification3d":  # the image as MONAI's inferers see it
        image = _image(ctx).as_tensor().detach().cpu().numpy()
        t0 = time.perf_counter()
        raw_all = ctx.runtime.run(image[None].astype(np.float32))
        ctx.inference_s += time.perf_counter() - t0
    else:
        raw_all = ctx.outputs
    if not raw_all:
        raise EngineError("no model outputs: put batch_2d before classify")
    raw = raw_all.get(name) if name else next(iter(raw_all.values()))
    if raw is None:
        raise EngineError(f"model has no output {name!r} (has {sorted(raw_all)})")
    raw = np.asarray(raw).reshape(len(raw), -1)
    if declared.channels is not None and raw.shape[1] != declared.channels:
        raise inference.ModelOutputError(f"model output has {raw.shape[1]} channels; the "
                                         f"pipeline file declares {declared.channels}")
    probs = inference.to_probabilities(raw, values=declared.values,
                                       activation=declared.activation, axis=1)

    def decide(row: np.ndarray) -> list[postprocess.Classification]:
        return postprocess.classify(row, finding=p.finding, classes=model.classes,
                                    activation=declared.activation,
                                    thresholds=declared.thresholds,
                                    otherwise=declared.otherwise)

    if ctx.pipeline.spec.task == "classification2d":
        ctx.image_classes = [(im.source, decide(row))
                             for im, row in zip(ctx.images, probs, strict=True)]
        study = probs.mean(axis=0) if p.aggregate == "mean" else probs.max(axis=0)
        if declared.activation == "softmax" and p.aggregate == "max":
            study = study / study.sum()
    else:
        study = probs[0]
    ctx.classifications = decide(study)
    return ", ".join(f"{c.finding}={c.decision} ({c.probability:.3f})"
                     for c in ctx.classifications)[:500]


# --------------------------------------------------------------------------- results


def _headers(ctx: RunContext, sources: list[Dataset], spacing_mm: float | None
             ) -> list[Dataset]:
    """The sources' repaired headers, made once per run (result_sources)."""
    if len(ctx.headers) != len(sources):
        ctx.headers = []
        for ds in sources:
            header, repair = result_header(ds, slice_thickness_mm=spacing_mm)
            ctx.headers.append(header)
            ctx.repair.merge(repair)
    return ctx.headers


def _validated(kind: str, ds: Dataset) -> str:
    """Raise InputError listing dciodvfy's errors (no values); a note otherwise."""
    found = validation.errors(ds)
    if found is None:
        return "not validated: dciodvfy is not installed"
    if found:
        raise InputError(f"the {kind} built from this series is not valid DICOM "
                         f"(dciodvfy, {len(found)} error(s)): " + "; ".join(found[:5]))
    return "dciodvfy: valid"


def _enhanced_thickness(ds: Dataset) -> float | None:
    from engine.ops.volume import functional_group

    measures = functional_group(ds, 0, "PixelMeasuresSequence")
    try:
        value = float(measures.SliceThickness) if measures is not None else 0.0
    except (AttributeError, TypeError, ValueError):
        return None
    return value if value > 0 else None


@operator("write_seg", tasks=("segmentation3d",))
def _write_seg(ctx: RunContext, _: BaseModel) -> str:
    """DICOM SEG over the source series (single-frame or enhanced multi-frame), in
    memory and dciodvfy-valid; when none can be written, the reason is kept and
    ``write_sr`` references the source images instead."""
    vol = ctx.require_volume()
    labels = ctx.require(ctx.labels, "labels", "argmax or threshold")
    out = ctx.pipeline.spec.outputs
    desc = out.series_description
    if out.blinding_hash and ctx.blinding_hash:
        desc = f"{desc} {ctx.blinding_hash}"
    try:
        if vol.frames:  # enhanced multi-frame: thickness from its functional groups
            headers = _headers(ctx, vol.sources, None)
            thickness = _enhanced_thickness(vol.sources[0])
        else:
            headers = _headers(ctx, vol.sources, vol.spacing[0])
            thickness = float(headers[0].SliceThickness)
        seg = dicom_results.build_seg(headers, labels, ctx.pipeline.spec.model.labels,
                                      ctx.provenance, series_description=desc,
                                      frames=vol.frames, spacing_mm=vol.spacing,
                                      slice_thickness_mm=thickness,
                                      codebook=ctx.pipeline.spec.codes)
        note = _validated("SEG", seg)
    except Exception as exc:  # noqa: BLE001 - the taxonomy decides (engine.errors)
        if is_retryable(exc):
            raise
        ctx.seg_refused = safe_reason(exc)
        return f"no SEG: {ctx.seg_refused}"
    ctx.results.append(("SEG", seg))
    repaired = f"; source values {ctx.repair.summary()}" if ctx.repair else ""
    return f"{seg.SOPInstanceUID} ({note}{repaired})"[:500]


def _classification_sr(ctx: RunContext) -> Dataset:
    """The classifications as a TID 1500 SR over the images (2D) or the series (3D)."""
    if not ctx.classifications:
        raise EngineError("write_sr needs classify before it")
    two_d = ctx.pipeline.spec.task == "classification2d"
    if two_d:
        sources = [src for src, _ in ctx.image_classes]
        headers = _headers(ctx, sources, None)
    else:
        vol = ctx.require_volume()
        headers = _headers(ctx, vol.sources, None if vol.frames else vol.spacing[0])
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    aggregate = next((pr.aggregate for pr in ctx.pipeline.operator_params
                      if isinstance(pr, ClassifyParams)), "mean")
    results = []
    for i, c in enumerate(ctx.classifications):
        classes = []
        for name, prob in c.probabilities.items():
            per_image = tuple(
                (by_uid[str(src.SOPInstanceUID)], cls[i].probabilities[name])
                for src, cls in ctx.image_classes) if two_d else ()
            classes.append(dicom_results.ClassProbability(name, prob, per_image))
        results.append(dicom_results.ClassificationResult(c.finding, c.decision,
                                                          tuple(classes)))
    derivation = {"mean": dicom_results.codes.SCT.Mean,
                  "max": dicom_results.codes.SCT.Maximum}[aggregate] if two_d else None
    return dicom_results.build_classification_sr(results, headers, ctx.provenance,
                                                 aggregate=derivation,
                                                 codebook=ctx.pipeline.spec.codes)


@operator("write_sr", tasks=ALL_TASKS)
def _write_sr(ctx: RunContext, _: BaseModel) -> str:
    """TID 1500 SR: segment volumes (+ change, progression), detections or
    classifications, coded by the file's ``codes``; dciodvfy-valid. Without a SEG
    (``write_seg`` could not write one) the volumes reference the source images (TID
    300 image references) instead of segments."""
    codebook = ctx.pipeline.spec.codes
    if ctx.pipeline.spec.task in ("classification2d", "classification3d"):
        sr = _classification_sr(ctx)
    elif ctx.pipeline.spec.task == "detection2d":
        unique = {str(src.SOPInstanceUID): src for src, _ in ctx.detections}
        headers = _headers(ctx, list(unique.values()), None)
        by_uid = {str(h.SOPInstanceUID): h for h in headers}
        findings = [dicom_results.HipFinding(by_uid[str(src.SOPInstanceUID)], d.label,
                                             d.classification, d.probability, d.box)
                    for src, d in ctx.detections]
        finding = next((pr.finding for pr in ctx.pipeline.operator_params
                        if isinstance(pr, DetectionsParams)), None)
        sr = dicom_results.build_findings_sr(findings, ctx.provenance, finding=finding,
                                             codebook=codebook)
    else:
        seg = next((ds for kind, ds in ctx.results if kind == "SEG"), None)
        if seg is None and ctx.seg_refused is None:
            raise EngineError("write_sr needs write_seg before it (measurements reference it)")
        names = ctx.pipeline.spec.model.labels
        c = ctx.comparison
        tracked_label = None
        for pr in ctx.pipeline.operator_params:
            if isinstance(pr, LongitudinalParams):
                tracked_label = pr.label
        items = []
        for number, value in enumerate(sorted(names), start=1):
            label = names[value]
            vol_ml = next(m.value for m in ctx.measurements if m.name == f"volume_{label}")
            tracked = c is not None and label == tracked_label
            items.append(dicom_results.SegmentMeasurement(
                number, label, vol_ml,
                c.change_from_baseline_pct if tracked and c else None,
                c.change_from_prior_pct if tracked and c else None,
                c.progression if tracked and c else None))
        vol = ctx.require_volume()
        headers = _headers(ctx, vol.sources, None if vol.frames else vol.spacing[0])
        if seg is not None:
            sr = dicom_results.build_volume_sr(seg, headers, items, ctx.provenance,
                                               codebook=codebook)
        else:
            sr = dicom_results.build_volume_sr_on_images(headers, items, ctx.provenance,
                                                         codebook=codebook)
    note = _validated("SR", sr)
    ctx.results.append(("SR", sr))
    refs = " (image references: no SEG)" if ctx.seg_refused else ""
    return f"{sr.SOPInstanceUID}{refs} ({note})"


# --------------------------------------------------------------------------- consistency


def consistency_problems(spec: PipelineSpec, params: Sequence[BaseModel]
                         ) -> list[tuple[tuple[object, ...], str]]:
    """What in a pipeline file contradicts itself, as (location, message) pairs for
    ``engine.spec`` to report with line numbers: the declared model output against the
    operators that read it, class names against codes and tasks."""
    problems: list[tuple[tuple[object, ...], str]] = []
    model, out = spec.model, spec.model.output
    ops = [op.op for op in spec.operators]
    classification = spec.task in ("classification2d", "classification3d")
    if classification and not model.classes:
        problems.append((("model", "classes"), f"a {spec.task} model needs its class names "
                         "in output channel order"))
    if classification and "classify" not in ops:
        problems.append((("operators",), f"a {spec.task} pipeline needs a classify operator"))
    if classification and out.activation == "softmax" and len(model.classes) == 1:
        problems.append((("model", "classes"), "one class with softmax: give both classes "
                         "(and activation: sigmoid for a one-channel model)"))
    if out.otherwise is not None and out.activation == "sigmoid":
        problems.append((("model", "output", "otherwise"), "otherwise applies to softmax "
                         "outputs (a sigmoid class is present or absent)"))
    for i, (op, pr) in enumerate(zip(ops, params, strict=False)):
        classes = (pr.extra.get("classes") if isinstance(pr, MonaiParams)
                   and pr.extra.get("model") is None else None)  # a MONAI inferer of the model
        if isinstance(classes, int):
            if out.activation == "softmax" and classes < 2:
                problems.append((("operators", i, "params", "classes"),
                                 "one channel needs model.output.activation: sigmoid"))
            if out.channels is not None and out.channels != classes:
                problems.append((("operators", i, "params", "classes"),
                                 f"{classes} channels, but model.output.channels is "
                                 f"{out.channels}"))
        if op == "argmax" and out.activation == "sigmoid":
            problems.append((("operators", i, "op"), "argmax needs softmax outputs; sigmoid "
                             "channels are decided by threshold"))
    return problems


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class StepTiming:
    index: int
    operator: str
    duration_s: float
    detail: str | None


def run_steps(ctx: RunContext, *, stop_after_selection_if_empty: bool = True,
              on_step: Callable[[StepTiming], None] | None = None) -> list[StepTiming]:
    """Run the pipeline's operators in order. Returns their timings.

    When selection finds nothing, the run stops there (the caller records a skip).
    Any exception is re-raised as ``OperatorError`` carrying the operator's name, the
    series and a reason without values; its ``final`` says whether a retry can help.
    """
    timings = []
    for index, (op, params) in enumerate(zip(ctx.pipeline.spec.operators,
                                             ctx.pipeline.operator_params, strict=True)):
        operator_ = OPERATORS[op.op]
        t0 = time.perf_counter()
        try:
            detail = operator_.fn(ctx, params)
        except OperatorError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
            series = str(ctx.series[0].get("SeriesInstanceUID", "")) if ctx.series else None
            raise OperatorError(op.op, exc, series or None) from exc
        timing = StepTiming(index, op.op, time.perf_counter() - t0, detail)
        timings.append(timing)
        if on_step is not None:
            on_step(timing)
        if (op.op == "select_series" and stop_after_selection_if_empty and ctx.selection
                and not ctx.selection.chosen):
            break
    return timings
