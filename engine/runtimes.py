"""Inference runtimes behind one interface, and the choice between them.

``Runtime.run(batch) -> {output name: array}`` is all the operators see. Three kinds:

- ``onnxruntime-cpu``: ONNX Runtime's CPU provider. The path verified on the build
  machines (no GPU there).
- ``onnxruntime-cuda``: ONNX Runtime with ``CUDAExecutionProvider`` (package
  ``onnxruntime-gpu``); written against ORT's documented provider API, not run here.
- ``tensorrt``: ``engine.tensorrt_runtime`` (TensorRT + pycuda, the ``gpu`` extra);
  not run here.

``select_runtime`` is pure: given what a host offers (``HostCapabilities``) and what
the pipeline asks for, it returns the runtime to use and a sentence saying why the
others were not used. That sentence goes into the inference event.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.errors import ModelFailed, ModelIntegrityError, RuntimeUnavailable

AUTO = "auto"
ORT_CPU = "onnxruntime-cpu"
ORT_CUDA = "onnxruntime-cuda"
TENSORRT = "tensorrt"
RUNTIME_NAMES = (AUTO, ORT_CPU, ORT_CUDA, TENSORRT)


class Runtime(Protocol):
    name: str

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_model(path: Path, expected_sha256: str) -> None:
    """Refuse a model file whose bytes are not the ones the pipeline file names."""
    if not path.is_file():
        raise ModelIntegrityError(f"model file {path} does not exist")
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise ModelIntegrityError(
            f"model file {path} has SHA-256 {actual}, but the pipeline file expects "
            f"{expected_sha256}: the file was changed or the pipeline names the wrong one"
        )


# --------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class HostCapabilities:
    """What this host can run, found by ``probe_host`` (or given in tests)."""

    gpu: bool
    ort_providers: tuple[str, ...]
    tensorrt_importable: bool
    pycuda_importable: bool
    gpu_name: str | None = None


@dataclass(frozen=True)
class RuntimeChoice:
    name: str
    reason: str


def probe_host() -> HostCapabilities:
    """Look without importing heavy GPU modules: ORT's provider list, module specs, and
    whether an NVIDIA driver is visible (``nvidia-smi`` or ``/dev/nvidia0``)."""
    try:
        import onnxruntime as ort

        providers = tuple(ort.get_available_providers())
    except ImportError:
        providers = ()
    gpu = Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None
    return HostCapabilities(
        gpu=gpu,
        ort_providers=providers,
        tensorrt_importable=importlib.util.find_spec("tensorrt") is not None,
        pycuda_importable=importlib.util.find_spec("pycuda") is not None,
    )


def _why_not_tensorrt(host: HostCapabilities) -> str | None:
    missing = []
    if not host.tensorrt_importable:
        missing.append("tensorrt not installed")
    if not host.pycuda_importable:
        missing.append("pycuda not installed")
    if not host.gpu:
        missing.append("no GPU")
    return ", ".join(missing) or None


def _why_not_cuda(host: HostCapabilities) -> str | None:
    missing = []
    if "CUDAExecutionProvider" not in host.ort_providers:
        missing.append("onnxruntime has no CUDAExecutionProvider")
    if not host.gpu:
        missing.append("no GPU")
    return ", ".join(missing) or None


def select_runtime(requested: str, host: HostCapabilities) -> RuntimeChoice:
    """The runtime to use for ``requested`` on ``host``, with the reason.

    ``auto`` prefers TensorRT, then ONNX Runtime CUDA, then CPU, and says why each
    faster one was passed over. An explicit request that the host cannot honour
    raises ``RuntimeUnavailable`` (a pipeline pinned to a GPU must not silently run
    on CPU and miss its time budget unnoticed).
    """
    if requested not in RUNTIME_NAMES:
        raise RuntimeUnavailable(f"unknown runtime {requested!r}; one of {RUNTIME_NAMES}")
    trt_no, cuda_no = _why_not_tensorrt(host), _why_not_cuda(host)
    if requested == TENSORRT:
        if trt_no:
            raise RuntimeUnavailable(f"tensorrt requested but unavailable: {trt_no}")
        return RuntimeChoice(TENSORRT, "requested by the pipeline")
    if requested == ORT_CUDA:
        if cuda_no:
            raise RuntimeUnavailable(f"onnxruntime-cuda requested but unavailable: {cuda_no}")
        return RuntimeChoice(ORT_CUDA, "requested by the pipeline")
    if requested == ORT_CPU:
        return RuntimeChoice(ORT_CPU, "requested by the pipeline")
    if trt_no is None:
        return RuntimeChoice(TENSORRT, "auto: tensorrt, pycuda and a GPU are present")
    if cuda_no is None:
        return RuntimeChoice(ORT_CUDA, f"auto: tensorrt not used ({trt_no})")
    return RuntimeChoice(
        ORT_CPU, f"auto: tensorrt not used ({trt_no}); onnxruntime-cuda not used ({cuda_no})"
    )


# --------------------------------------------------------------------------- ONNX Runtime


class OnnxRuntimeSession:
    """An ONNX Runtime session with one image input; outputs by name."""

    name = ORT_CPU
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(self, session: object, input_name: str, output_names: list[str]) -> None:
        self._session = session
        self.input_name = input_name
        self.output_names = output_names

    @classmethod
    def load(cls, path: Path, *, threads: int = 0) -> OnnxRuntimeSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        missing = [p for p in cls.providers if p not in available]
        if missing:
            raise RuntimeUnavailable(f"onnxruntime lacks {missing} (has {sorted(available)})")
        try:
            session = ort.InferenceSession(str(path), sess_options=options,
                                           providers=list(cls.providers))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors
            raise ModelIntegrityError(f"onnxruntime cannot load {path}: {exc}") from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelIntegrityError(f"{path}: expected one input, found {len(inputs)}")
        return cls(session, inputs[0].name, [o.name for o in session.get_outputs()])

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            outs = self._session.run(  # type: ignore[attr-defined]
                self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)}
            )
        except Exception as exc:  # noqa: BLE001 - translate ORT's errors to ours
            raise ModelFailed(f"{self.name} failed on input {batch.shape}: {exc}") from None
        return dict(zip(self.output_names, outs, strict=True))


class OnnxRuntimeCpu(OnnxRuntimeSession):
    name = ORT_CPU
    providers = ("CPUExecutionProvider",)


class OnnxRuntimeCuda(OnnxRuntimeSession):
    """CUDA provider first, CPU for any node CUDA does not implement (ORT's own fallback)."""

    name = ORT_CUDA
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")


def load_runtime(choice: RuntimeChoice, model: Path, model_sha256: str, *,
                 cache_dir: Path | None = None, fp16: bool = False, threads: int = 0) -> Runtime:
    """Load ``model`` on the chosen runtime (after checking its hash)."""
    verify_model(model, model_sha256)
    if choice.name == TENSORRT:
        from engine.tensorrt_runtime import TensorRtRuntime

        return TensorRtRuntime.load(model, model_sha256,
                                    cache_dir=cache_dir or model.parent / ".trt-cache", fp16=fp16)
    if choice.name == ORT_CUDA:
        return OnnxRuntimeCuda.load(model, threads=threads)
    return OnnxRuntimeCpu.load(model, threads=threads)
