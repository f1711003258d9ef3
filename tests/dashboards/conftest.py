"""A known event set, published to a real nats-server, folded into a DuckDB file, and the
dashboard started on it (the front, Streamlit behind it) on a free port; Debian's Chromium
drives it.

The event set is the synthetic site (deterministic for its seed) plus two facts the
pages must show: a second HFD model version (1.1.0, deployed by ``dr.governance`` with
its model card) whose completions replace 1.0.0 from week 4 on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bench.dashboards import browser
from dashboards.process import PagesProcess
from demo.synthetic import SyntheticConfig, SyntheticSite, runtime_target_s
from events.base import Event
from events.catalogue import (
    InferenceCompleted,
    NotRunReason,
    PipelineDeployed,
    RouteUnmatched,
    Stage,
    StudyNotRun,
)
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboards"
CARD = ROOT / "engine" / "models" / "hfd.card.md"
NEW_VERSION = "1.1.0"
#: a study completed for a pipeline nobody deployed (issue 16): the reliability page lists it
NOT_RUN = StudyNotRun.new(
    actor="worker:test", study_uid="1.2.826.0.1.3680043.8.498.16016", pipeline="myhip",
    reason_code=NotRunReason.NOT_DEPLOYED, trigger="ingest.study.completed",
    reason="pipeline myhip is not deployed (lastmile pipelines deploy FILE)")
#: a study sent to the general AE title that no routing rule matched (two series, one
#: study): listed beside NOT_RUN, once
UNROUTED = [RouteUnmatched.new(
    actor="scp:LASTMILE", study_uid="1.2.826.0.1.3680043.8.498.16017", called_ae="LASTMILE",
    series_uid=f"1.2.826.0.1.3680043.8.498.1601{i}", reason="no routing rule matched")
    for i in (8, 9)]


@dataclass(frozen=True)
class KnownSite:
    events: list[Event]
    config: SyntheticConfig
    db: Path
    bus: BusSettings
    url: str
    unblinding: dict[str, str]


def known_events() -> tuple[list[Event], SyntheticConfig]:
    events, cfg, _ = known_site_events()
    return events, cfg


def known_site_events() -> tuple[list[Event], SyntheticConfig, dict[str, str]]:
    cfg = SyntheticConfig(seed=5, studies=140, weeks=8, drift_week=5)
    site = SyntheticSite(cfg)
    switch = cfg.start + timedelta(weeks=4)
    upgrade = PipelineDeployed.new(
        actor="dr.governance", pipeline="hfd", name="hfd", version=NEW_VERSION,
        file_sha256="f" * 64, model_sha256="a" * 64, stage=Stage.VALIDATION, ae_title="LM_HFD",
        model_card=str(CARD), reason="retrained on more hips",
        runtime_target_s=runtime_target_s("hfd"))
    upgrade = msgspec.structs.replace(upgrade, occurred_at=switch - timedelta(days=1),
                                      recorded_at=switch - timedelta(days=1))
    out: list[Event] = []
    for ev in site.events():
        if isinstance(ev, InferenceCompleted) and ev.pipeline == "hfd" and \
                ev.occurred_at >= switch:
            ev = msgspec.structs.replace(ev, model_version=NEW_VERSION,
                                         model_sha256="a" * 64)
        out.append(ev)
    first_study = next(i for i, e in enumerate(out) if e.study_uid is not None)
    out.insert(first_study, upgrade)
    out += [msgspec.structs.replace(ev, occurred_at=out[-1].occurred_at,
                                    recorded_at=out[-1].occurred_at)
            for ev in (NOT_RUN, *UNROUTED)]
    return out, cfg, dict(site.unblinding)


async def _publish_fold(settings: BusSettings, events: list[Event], db: Path) -> None:
    from bench.dashboards import publish_and_fold

    bus = await EventBus.connect(settings)
    try:
        await publish_and_fold(bus, events, db)
    finally:
        await bus.close()


@pytest.fixture(scope="session")
def known_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnownSite]:
    tmp = tmp_path_factory.mktemp("dash")
    events, cfg, unblinding = known_site_events()
    key = tmp / "unblinding.json"
    key.write_text(json.dumps(unblinding))
    with EmbeddedNats(tmp / "nats", port=free_port(), sync="2m") as server:
        settings = BusSettings(servers=(server.url,), stream="DASHTEST", publish_retry_s=5.0)
        db = tmp / "read.duckdb"
        asyncio.run(_publish_fold(settings, events, db))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        # demo mode (no users file): signed in as the demo viewer, who may see governance
        with PagesProcess(db, settings, free_port(), log_path=ARTIFACTS / "streamlit.log",
                          state_dir=tmp, extra_env={"LASTMILE_UNBLINDING_KEY": str(key),
                                                    "LASTMILE_DEMO": "1"}) as proc:
            yield KnownSite(events, cfg, db, settings, proc.url, unblinding)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Module-scoped: Playwright's sync API keeps an event loop running on this thread
    while it is open, which async tests in other modules must not meet."""
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    p = chromium.new_page(viewport={"width": 1500, "height": 1100})
    try:
        yield p
    finally:
        p.close()
