"""Inference runtimes behind one interface, and the choice between them.

``Runtime.run(batch) -> {output name: array}`` is all the operators see. Three kinds:

- ``onnxruntime-cpu``: ONNX Runtime's CPU provider. The path verified on the build
  machines (no GPU there).
- ``onnxruntime-cuda``: ONNX Runtime with ``CUDAExecutionProvider`` (package
  ``onnxruntime-gpu``); written against ORT's documented provider API, not run here.
- ``tensorrt``: ``engine.tensorrt_runtime`` (TensorRT + pycuda, the ``gpu`` extra);
  not run here.
- ``torch``: PyTorch for TorchScript (``.ts``/``.pt``) and ``torch.export`` (``.pt2``)
  programs: CPU on the build machines, CUDA with fp16 autocast where a GPU is present
  (checked on a lent GPU host by ``lastmile bench gpu``). torch is imported only when a
  pipeline uses it, so the command line and ONNX-only workers never load it.

Which family applies follows from the model file (``model_format``): an ONNX file runs on
ONNX Runtime or TensorRT, a PyTorch program on ``torch``.

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
from typing import Any, Protocol

import numpy as np

from engine.errors import ModelFailed, ModelIntegrityError, RuntimeUnavailable

AUTO = "auto"
ORT_CPU = "onnxruntime-cpu"
ORT_CUDA = "onnxruntime-cuda"
TENSORRT = "tensorrt"
TORCH = "torch"
RUNTIME_NAMES = (AUTO, ORT_CPU, ORT_CUDA, TENSORRT, TORCH)

ONNX_FORMAT = "onnx"
TORCH_FORMAT = "torch"
_TORCH_SUFFIXES = (".ts", ".pt", ".pth", ".pt2")


def model_format(path: Path) -> str:
    """``"onnx"`` for ``.onnx`` files, ``"torch"`` for TorchScript (``.ts``, ``.pt``,
    ``.pth``) and ``torch.export`` (``.pt2``) programs. Raises ``RuntimeUnavailable``
    for any other suffix (the pipeline file names a model no runtime here can load)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return ONNX_FORMAT
    if suffix in _TORCH_SUFFIXES:
        return TORCH_FORMAT
    raise RuntimeUnavailable(
        f"model file suffix {suffix or '(none)'!r} is not a known model format: "
        f".onnx (ONNX Runtime, TensorRT) or {', '.join(_TORCH_SUFFIXES)} (torch)")


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
    torch_importable: bool = False


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
        torch_importable=importlib.util.find_spec("torch") is not None,
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


def select_runtime(requested: str, host: HostCapabilities,
                   fmt: str = ONNX_FORMAT) -> RuntimeChoice:
    """The runtime to use for ``requested`` on ``host`` for a model of format ``fmt``
    (``model_format``), with the reason.

    For ONNX, ``auto`` prefers TensorRT, then ONNX Runtime CUDA, then CPU, and says why
    each faster one was passed over. For a PyTorch program, ``auto`` is ``torch`` (on CUDA
    where a GPU is present, else CPU; the reason says which). An explicit request that the
    host cannot honour, or that cannot load the model's format, raises
    ``RuntimeUnavailable`` (a pipeline pinned to a GPU must not silently run on CPU and
    miss its time budget unnoticed).
    """
    if requested not in RUNTIME_NAMES:
        raise RuntimeUnavailable(f"unknown runtime {requested!r}; one of {RUNTIME_NAMES}")
    if fmt == TORCH_FORMAT:
        if requested not in (AUTO, TORCH):
            raise RuntimeUnavailable(
                f"{requested} runs ONNX models, but the model is a PyTorch program: "
                "use runtime torch (or auto), or export the model to ONNX")
        if not host.torch_importable:
            raise RuntimeUnavailable("torch requested but unavailable: torch not installed")
        where = "CUDA" if host.gpu else "CPU (no GPU)"
        how = "requested by the pipeline" if requested == TORCH else "auto: a PyTorch program"
        return RuntimeChoice(TORCH, f"{how}; on {where}")
    if requested == TORCH:
        raise RuntimeUnavailable(
            "torch requested, but the model is an ONNX file: use an ONNX runtime or auto")
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


# --------------------------------------------------------------------------- PyTorch


class TorchRuntime:
    """A TorchScript (``torch.jit.load``) or ``torch.export`` (``torch.export.load``)
    program with one image input.

    ``run(batch)`` takes float32 ``(N, C, *spatial)`` and returns float32 arrays by output
    name: a program that returns a ``dict[str, Tensor]`` names its own outputs; one that
    returns a tensor or a tuple gets ``output_names`` (default ``output``, ``output1``, …).
    On CUDA with ``fp16=True`` the forward pass runs under ``torch.autocast(float16)``
    (outputs are cast back to float32). torch is imported here, never at module import.
    """

    name = TORCH

    def __init__(self, module: object, device: str, fp16: bool,
                 output_names: tuple[str, ...] = ()) -> None:
        self._module = module
        self.device = device
        self.fp16 = fp16 and device == "cuda"
        self.output_names = output_names

    @classmethod
    def load(cls, path: Path, *, device: str = "auto", fp16: bool = False,
             threads: int = 0, output_names: tuple[str, ...] = ()) -> TorchRuntime:
        try:
            import torch
        except ImportError as exc:
            raise RuntimeUnavailable(f"torch runtime needs PyTorch installed: {exc}") from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable("torch: CUDA requested but torch sees no GPU")
        if threads:
            torch.set_num_threads(threads)
        try:
            if path.suffix.lower() == ".pt2":
                module = torch.export.load(str(path)).module()
                module.to(device)
            else:
                module = torch.jit.load(str(path), map_location=device)
                module.eval()
        except Exception as exc:  # noqa: BLE001 - torch raises many untyped errors
            raise ModelIntegrityError(
                f"torch cannot load {path.name}: {type(exc).__name__}") from None
        return cls(module, device, fp16, output_names)

    def _named(self, out: Any) -> dict[str, Any]:
        if isinstance(out, dict):
            return dict(out)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        names = list(self.output_names) or [
            "output" if i == 0 else f"output{i}" for i in range(len(outs))]
        if len(names) != len(outs):
            raise ModelFailed(f"torch program returned {len(outs)} outputs, the pipeline "
                              f"names {len(names)} ({', '.join(names)})")
        return dict(zip(names, outs, strict=True))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
        try:
            with torch.inference_mode(), torch.autocast(
                    device_type=self.device, dtype=torch.float16, enabled=self.fp16):
                out = self._module(x)  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - translate torch's errors to ours
            raise ModelFailed(f"{self.name} failed on input {batch.shape}: "
                              f"{type(exc).__name__}") from None
        return {k: v.detach().float().cpu().numpy() for k, v in self._named(out).items()}


def load_runtime(choice: RuntimeChoice, model: Path, model_sha256: str, *,
                 cache_dir: Path | None = None, fp16: bool = False, threads: int = 0) -> Runtime:
    """Load ``model`` on the chosen runtime (after checking its hash)."""
    verify_model(model, model_sha256)
    if choice.name == TORCH:
        return TorchRuntime.load(model, fp16=fp16, threads=threads)
    if choice.name == TENSORRT:
        from engine.tensorrt_runtime import TensorRtRuntime

        return TensorRtRuntime.load(model, model_sha256,
                                    cache_dir=cache_dir or model.parent / ".trt-cache", fp16=fp16)
    if choice.name == ORT_CUDA:
        return OnnxRuntimeCuda.load(model, threads=threads)
    return OnnxRuntimeCpu.load(model, threads=threads)
