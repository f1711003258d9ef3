"""TensorRT runtime (GPU hosts only; the ``gpu`` extra: ``tensorrt`` + ``pycuda``).

NOT VERIFIED on the build machines: they have no GPU, and neither package installs
there. Written against the TensorRT 10 Python API (``Builder``, ``OnnxParser``,
``build_serialized_network``, named I/O tensors with ``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``) and pycuda's driver API. This module
imports neither at import time, so the engine runs (and the selection logic is
tested) without them.

An engine (plan) is built once from the ONNX file and cached under a key of model
hash + GPU name + TensorRT version + precision: a plan is only valid for the GPU and
TensorRT version that built it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelFailed, ModelIntegrityError, RuntimeUnavailable

DEFAULT_MAX_BATCH = 8


def engine_cache_key(model_sha256: str, gpu_name: str, trt_version: str, fp16: bool) -> str:
    """File name of a cached plan: changes whenever any input of the build changes."""
    raw = "\x1f".join((model_sha256, gpu_name, trt_version, "fp16" if fp16 else "fp32"))
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _import() -> tuple[Any, Any]:
    try:
        import pycuda.autoinit  # noqa: F401  - creates the CUDA context
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"tensorrt runtime needs the 'gpu' extra (tensorrt, pycuda) and a CUDA driver: {exc}"
        ) from None
    return trt, cuda


class TensorRtRuntime:
    name = "tensorrt"

    def __init__(self, engine: Any, cuda: Any, trt: Any) -> None:
        self._engine = engine
        self._cuda = cuda
        self._trt = trt
        self._context = engine.create_execution_context()
        self._stream = cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        if len(inputs) != 1:
            raise ModelIntegrityError(f"expected one input tensor, found {inputs}")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n not in inputs]

    @classmethod
    def load(cls, onnx_path: Path, model_sha256: str, *, cache_dir: Path, fp16: bool = False,
             max_batch: int = DEFAULT_MAX_BATCH) -> TensorRtRuntime:
        trt, cuda = _import()
        gpu_name = cuda.Device(0).name()
        key = engine_cache_key(model_sha256, gpu_name, trt.__version__, fp16)
        plan_path = cache_dir / f"{key}.plan"
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if plan_path.is_file():
            engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if engine is not None:
                return cls(engine, cuda, trt)
        plan = cls._build(trt, logger, onnx_path, fp16, max_batch)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = plan_path.with_suffix(".tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, plan_path)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise ModelIntegrityError(f"TensorRT could not deserialise the plan built from "
                                      f"{onnx_path}")
        return cls(engine, cuda, trt)

    @staticmethod
    def _build(trt: Any, logger: Any, onnx_path: Path, fp16: bool, max_batch: int) -> bytes:
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch always
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelIntegrityError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = tuple(int(d) for d in tensor.shape[1:])
            if any(d < 0 for d in rest):
                raise ModelIntegrityError(
                    f"{onnx_path}: only the batch dimension may be dynamic for TensorRT "
                    f"(input {tensor.name} has shape {tuple(tensor.shape)})")
            profile.set_shape(tensor.name, (1, *rest), (max(1, max_batch // 2), *rest),
                              (max_batch, *rest))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelIntegrityError(f"TensorRT failed to build an engine for {onnx_path}")
        return bytes(plan)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cuda, trt = self._cuda, self._trt
        x = np.ascontiguousarray(batch, np.float32)
        try:
            self._context.set_input_shape(self.input_name, x.shape)
            d_in = cuda.mem_alloc(x.nbytes)
            cuda.memcpy_htod_async(d_in, x, self._stream)
            self._context.set_tensor_address(self.input_name, int(d_in))
            host: dict[str, np.ndarray] = {}
            device = []
            for name in self.output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                dtype = trt.nptype(self._engine.get_tensor_dtype(name))
                host[name] = np.empty(shape, dtype)
                d_out = cuda.mem_alloc(host[name].nbytes)
                device.append((name, d_out))
                self._context.set_tensor_address(name, int(d_out))
            if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                raise ModelFailed("TensorRT execute_async_v3 returned False")
            for name, d_out in device:
                cuda.memcpy_dtoh_async(host[name], d_out, self._stream)
            self._stream.synchronize()
        except ModelFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - pycuda/TensorRT raise untyped errors
            raise ModelFailed(f"tensorrt failed on input {x.shape}: {exc}") from None
        return {k: v.astype(np.float32, copy=False) for k, v in host.items()}
