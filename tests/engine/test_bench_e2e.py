"""`lastmile bench e2e` runs end to end (figures come from the command, not from tests)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bench.e2e import STAGES, run_e2e_bench

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.mark.skipif(shutil.which("storescu") is None, reason="Debian dcmtk not installed")
async def test_bench_e2e_reports_every_stage_for_a_pipeline() -> None:
    result = await run_e2e_bench(studies=2, names=("hfd",), via="dicom")
    r = result.pipelines["hfd"]
    assert set(r["p50_s"]) == set(STAGES)
    assert r["p50_s"]["transfer"] > 0 and r["p50_s"]["completion"] > 0
    assert 0 < r["p50_s"]["inference"] < r["p50_s"]["total"] < r["p50_s"]["end_to_end"]
    assert 0 < r["platform_overhead_share_p50"] < 1
    assert any("storescu" in n for n in result.notes)


async def test_bench_e2e_splits_torch_and_cascade_rows_and_runs_the_monai_peer() -> None:
    pytest.importorskip("torch", reason="the torch rows need torch (train extra)")
    from bench.e2e import SPLIT

    result = await run_e2e_bench(studies=1, names=("bts", "bts-torch", "bts-cascade"),
                                 via="feed")
    assert set(result.pipelines) == {"bts", "bts-torch", "bts-cascade"}
    # each row timed its own runs (one row's studies never stand in for another's)
    assert {n: r["runtime"] for n, r in result.pipelines.items()} == {
        "bts": "onnxruntime-cpu", "bts-torch": "torch", "bts-cascade": "onnxruntime-cpu"}
    for name, r in result.pipelines.items():
        split = {k: v["p50"] for k, v in r["split_s"].items()}
        assert set(split) == set(SPLIT), name
        # the three parts are the run: model + MONAI's part = the inferers, the rest platform
        assert 0 < split["model_compute"] <= r["p50_s"]["inference"], (name, split)
        assert split["monai_inferer_overhead"] >= 0 and split["platform_overhead"] > 0
        assert abs(sum(split.values()) - r["p50_s"]["total"]) < 0.01, (name, split)
        peer = r["monai_peer"]
        assert peer["repeats"] == 1 and 0 < peer["model_compute"]["p50"] \
            <= peer["inferer"]["p50"]
    # the cascade: the locator (SimpleInferer) and BTS (SlidingWindowInferer), both by hand
    cascade = result.pipelines["bts-cascade"]["monai_peer"]
    assert cascade["inferers"] == ["SimpleInferer", "SlidingWindowInferer"]
    bts = result.pipelines["bts-torch"]["monai_peer"]
    assert bts["inferers"] == ["SlidingWindowInferer"]
    # the crop made the cascade's window array smaller than the whole brain image
    assert np.prod(cascade["shapes"][1]) < np.prod(bts["shapes"][0])
