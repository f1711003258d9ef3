"""Lastmile GPU check: run TorchScript models on CPU and CUDA (fp32, fp16) and compare.

Self-contained on purpose: it needs only Python 3, PyTorch and numpy, so that it runs on a
GPU host that has none of Lastmile's other dependencies (no MONAI, pydicom or network).
``lastmile bench gpu --out DIR`` writes a bundle (this script, ``manifest.json``, the
TorchScript programs, their input arrays and the outputs computed on the CPU of the
machine that made the bundle); then, on the GPU host::

    python3 DIR/gpu_check.py DIR [--runs 20] [--json OUT.json]

For every model and every mode (``cpu-fp32``, ``cuda-fp32``, ``cuda-fp16`` = fp32 weights
under ``torch.autocast(float16)``, as the ``torch`` runtime does with ``fp16: true``) it
prints latency per forward pass (p50/p90 in ms over ``--runs`` timed runs after 3 warm-up
runs on CUDA (``--cpu-runs`` after one on the CPU), ``torch.cuda.synchronize`` around
each) and how far the outputs are from the
bundle's CPU reference: the largest absolute difference per output, and for
segmentation logits the agreement of the argmax masks (fraction of voxels with the same
label, and Dice per foreground label). Exit status 0 when every mode passes its
tolerance, 1 otherwise; CUDA modes are reported as "not run" when torch sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: tolerances per mode: largest |difference| relative to the output's range, and the
#: smallest mask agreement / Dice accepted
TOLERANCE = {
    "cpu-fp32": {"rel_diff": 1e-4, "agreement": 0.9999, "dice": 0.999},
    "cuda-fp32": {"rel_diff": 1e-3, "agreement": 0.9995, "dice": 0.995},
    "cuda-fp16": {"rel_diff": 2e-2, "agreement": 0.995, "dice": 0.98},
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def compare(kind: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Differences of ``got`` from ``ref`` (per output; masks for segmentation logits)."""
    out: dict = {"max_abs_diff": {}, "rel_diff": 0.0}
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            raise ValueError(f"output {name} has shape {g.shape}, reference {r.shape}")
        diff = float(np.abs(g.astype(np.float64) - r).max())
        scale = float(np.abs(r).max()) or 1.0
        out["max_abs_diff"][name] = diff
        out["rel_diff"] = max(out["rel_diff"], diff / scale)
    if kind == "segmentation":
        gm, rm = got["logits"].argmax(1), ref["logits"].argmax(1)
        out["agreement"] = float((gm == rm).mean())
        labels = [int(v) for v in np.unique(rm) if v != 0]
        out["dice"] = {str(v): _dice(gm == v, rm == v) for v in labels}
    elif kind == "detection":
        gm, rm = got["logits"].argmax(-1), ref["logits"].argmax(-1)
        out["agreement"] = float((gm == rm).mean())
        out["dice"] = {}
    return out


def passes(mode: str, kind: str, cmp: dict) -> bool:
    """Segmentation passes on its masks (agreement and Dice: logits may differ in fp16
    while every voxel keeps its label); other outputs on their values and classes."""
    tol = TOLERANCE[mode]
    if cmp.get("agreement", 1.0) < tol["agreement"]:
        return False
    if any(d < tol["dice"] for d in cmp.get("dice", {}).values()):
        return False
    return kind == "segmentation" or cmp["rel_diff"] <= tol["rel_diff"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_mode(path: Path, x: np.ndarray, mode: str, runs: int) -> tuple[dict, list[float]]:
    device = "cuda" if mode.startswith("cuda") else "cpu"
    warmup = 3 if device == "cuda" else 1
    fp16 = mode.endswith("fp16")
    module = torch.jit.load(str(path), map_location=device).eval()
    xt = torch.from_numpy(x).to(device)
    times: list[float] = []
    out: dict = {}
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.float16,
                                                enabled=fp16):
        for i in range(warmup + runs):
            _sync(device)
            t = time.perf_counter()
            res = module(xt)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1000.0)
            out = res
    arrays = {k: v.detach().float().cpu().numpy() for k, v in out.items()}
    return arrays, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--cpu-runs", type=int, default=1)
    ap.add_argument("--only", help="comma-separated model names (default: all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    cuda = torch.cuda.is_available()
    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "bundle_made_with": manifest.get("made_with", {}),
    }
    print(f"torch {env['torch']}  CUDA {env['cuda']}  GPU {env['gpu']}  "
          f"(bundle made with torch {env['bundle_made_with'].get('torch')})")
    if not cuda:
        print("torch sees no GPU: the CUDA modes are NOT run here")
    modes = ["cpu-fp32"] + (["cuda-fp32", "cuda-fp16"] if cuda else [])
    rows: list[dict] = []
    all_ok = True
    only = set(args.only.split(",")) if args.only else None
    for m in manifest["models"]:
        if only is not None and m["name"] not in only:
            continue
        data = np.load(args.bundle / m["arrays"])
        x = data["input"]
        ref = {k: data[f"ref_{k}"] for k in m["outputs"]}
        for mode in modes:
            runs = args.cpu_runs if mode == "cpu-fp32" else args.runs
            try:
                got, times = run_mode(args.bundle / m["file"], x, mode, runs)
                cmp = compare(m["kind"], got, ref)
                ok = passes(mode, m["kind"], cmp)
                err = None
            except Exception as exc:  # noqa: BLE001 - report, go on with the next mode
                times, cmp, ok, err = [], {}, False, f"{type(exc).__name__}: {exc}"[:300]
            all_ok &= ok
            row = {"model": m["name"], "mode": mode, "input_shape": list(x.shape),
                   "runs": len(times), "ok": ok, "error": err, **cmp,
                   "p50_ms": statistics.median(times) if times else None,
                   "p90_ms": float(np.percentile(times, 90)) if times else None}
            rows.append(row)
            lat = (f"p50 {row['p50_ms']:9.2f} ms  p90 {row['p90_ms']:9.2f} ms"
                   if times else "not run" + (f" ({err})" if err else ""))
            agree = f"agree {cmp['agreement']:.5f}" if "agreement" in cmp else ""
            dice = " ".join(f"dice[{k}] {v:.4f}" for k, v in cmp.get("dice", {}).items())
            print(f"{m['name']:<10} {mode:<10} {str(tuple(x.shape)):<22} {lat}  "
                  f"rel diff {cmp.get('rel_diff', float('nan')):.2e}  {agree} {dice}  "
                  f"{'ok' if ok else 'FAIL'}")
    result = {"env": env, "rows": rows, "ok": all_ok, "cuda_run": cuda}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
