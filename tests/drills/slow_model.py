"""A slow copy of the HFD reference model, deployed through a pipeline file alone.

The worker drill must kill a worker *during* inference, so inference has to take a few
seconds. Instead of patching the worker, the model itself is made expensive: the real
HFD network plus a branch of ``rounds`` 2048x2048 matrix products that starts from the
input (so ONNX Runtime cannot fold it away; the constant is an averaging matrix, so the
values stay bounded) and is added to the logits times zero (so the outputs, and the
findings, are the real model's).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import helper, numpy_helper

from engine.spec import REFERENCE_DIR, LoadedPipeline, load_pipeline


def slow_hfd_model(out: Path, rounds: int = 12, size: int = 2048) -> Path:
    base = load_pipeline(REFERENCE_DIR / "hfd.yaml")
    model = onnx.load(str(base.model_path))
    graph = model.graph
    fast = "logits_fast"
    for node in graph.node:
        node.output[:] = [fast if o == "logits" else o for o in node.output]
    graph.initializer.extend([
        numpy_helper.from_array(np.eye(size, dtype=np.float32), "slow_eye"),
        numpy_helper.from_array(np.full((size, size), 1.0 / size, dtype=np.float32), "slow_w"),
        numpy_helper.from_array(np.zeros((), dtype=np.float32), "slow_zero"),
    ])
    nodes = [helper.make_node("ReduceMean", ["image"], ["slow_mean"], keepdims=0),
             helper.make_node("Add", ["slow_eye", "slow_mean"], ["slow_0"])]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"slow_{i}", "slow_w"], [f"slow_{i + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"slow_{rounds}"], ["slow_sum"], keepdims=0),
              helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
              helper.make_node("Add", [fast, "slow_nothing"], ["logits"])]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def slow_hfd_pipeline(folder: Path, rounds: int = 12,
                      publishers: list[dict[str, object]] | None = None) -> LoadedPipeline:
    """``folder/hfd.yaml``: the reference HFD pipeline file with the slow model (and,
    if given, these publishers instead of the reference's)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = load_pipeline(REFERENCE_DIR / "hfd.yaml")
    model = slow_hfd_model(folder / "hfd-slow.onnx", rounds)
    data = yaml.safe_load(base.path.read_text())
    data["model"].update(path=str(model), card=str(base.card_path),
                         version="1.0.0-slow",
                         sha256=hashlib.sha256(model.read_bytes()).hexdigest())
    if publishers is not None:
        data["publishers"] = publishers
    path = folder / "hfd.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_pipeline(path)
