"""`lastmile bench e2e` runs end to end (figures come from the command, not from tests)."""

from __future__ import annotations

import shutil

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
