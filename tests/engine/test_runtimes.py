"""Runtime choice and fallback (pure), the ONNX Runtime CPU path, TensorRT importability."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from engine.errors import ModelIntegrityError, RuntimeUnavailable
from engine.runtimes import (
    ORT_CPU,
    ORT_CUDA,
    TENSORRT,
    HostCapabilities,
    OnnxRuntimeCpu,
    load_runtime,
    probe_host,
    select_runtime,
    verify_model,
)
from engine.spec import REFERENCE_DIR, load_pipeline

CPU_ONLY = HostCapabilities(gpu=False, ort_providers=("CPUExecutionProvider",),
                            tensorrt_importable=False, pycuda_importable=False)
FULL_GPU = HostCapabilities(gpu=True, ort_providers=("CUDAExecutionProvider",
                                                     "CPUExecutionProvider"),
                            tensorrt_importable=True, pycuda_importable=True)
CUDA_NO_TRT = HostCapabilities(gpu=True, ort_providers=("CUDAExecutionProvider",
                                                        "CPUExecutionProvider"),
                               tensorrt_importable=False, pycuda_importable=True)


def test_auto_prefers_tensorrt_then_cuda_then_cpu_and_says_why() -> None:
    assert select_runtime("auto", FULL_GPU).name == TENSORRT
    cuda = select_runtime("auto", CUDA_NO_TRT)
    assert cuda.name == ORT_CUDA and "tensorrt not installed" in cuda.reason
    cpu = select_runtime("auto", CPU_ONLY)
    assert cpu.name == ORT_CPU
    assert "tensorrt not used (tensorrt not installed, pycuda not installed, no GPU)" in cpu.reason
    assert "onnxruntime has no CUDAExecutionProvider" in cpu.reason


def test_gpu_without_tensorrt_driver_stack_falls_back_to_cpu() -> None:
    host = HostCapabilities(gpu=True, ort_providers=("CPUExecutionProvider",),
                            tensorrt_importable=True, pycuda_importable=False)
    choice = select_runtime("auto", host)
    assert choice.name == ORT_CPU and "pycuda not installed" in choice.reason


def test_explicit_gpu_runtime_on_cpu_host_is_refused_not_silently_downgraded() -> None:
    with pytest.raises(RuntimeUnavailable, match="tensorrt requested but unavailable"):
        select_runtime("tensorrt", CPU_ONLY)
    with pytest.raises(RuntimeUnavailable, match="onnxruntime-cuda requested"):
        select_runtime("onnxruntime-cuda", CPU_ONLY)
    assert select_runtime("onnxruntime-cpu", FULL_GPU).name == ORT_CPU


def test_this_host_has_no_gpu_and_probe_says_so() -> None:
    host = probe_host()
    assert "CPUExecutionProvider" in host.ort_providers
    assert select_runtime("auto", host).name == ORT_CPU


def test_onnxruntime_cpu_runs_the_reference_model_with_declared_shapes() -> None:
    hfd = load_pipeline(REFERENCE_DIR / "hfd.yaml")
    rt = load_runtime(select_runtime("auto", CPU_ONLY), hfd.model_path, hfd.spec.model.sha256)
    out = rt.run(np.zeros((3, 1, 128, 128), np.float32))
    assert out["boxes"].shape == (3, 2, 4) and out["logits"].shape == (3, 2, 3)


def test_tampered_model_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bts = load_pipeline(REFERENCE_DIR / "bts.yaml")
    copy = tmp_path / "bts.onnx"
    data = bytearray(bts.model_path.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        verify_model(copy, bts.spec.model.sha256)


def test_not_an_onnx_file_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelIntegrityError, match="cannot load"):
        OnnxRuntimeCpu.load(bad)


def test_tensorrt_module_imports_without_tensorrt_or_pycuda() -> None:
    assert "tensorrt" not in sys.modules and "pycuda" not in sys.modules
    mod = importlib.import_module("engine.tensorrt_runtime")
    key = mod.engine_cache_key("a" * 64, "Tesla T4", "10.0.1", fp16=True)
    assert key != mod.engine_cache_key("a" * 64, "Tesla T4", "10.0.1", fp16=False)
    assert key != mod.engine_cache_key("a" * 64, "A100", "10.0.1", fp16=True)
    assert key != mod.engine_cache_key("a" * 64, "Tesla T4", "10.3.0", fp16=True)
    with pytest.raises(RuntimeUnavailable, match="gpu"):
        mod.TensorRtRuntime.load(REFERENCE_DIR / "x.onnx", "a" * 64, cache_dir=REFERENCE_DIR)
    assert "tensorrt" not in sys.modules


def test_cuda_session_on_a_cpu_only_onnxruntime_is_unavailable() -> None:
    from engine.runtimes import OnnxRuntimeCuda

    hfd = load_pipeline(REFERENCE_DIR / "hfd.yaml")
    with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider"):
        OnnxRuntimeCuda.load(hfd.model_path)
