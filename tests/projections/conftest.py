"""Fixtures for the projections tests: a small deterministic synthetic site, folded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from demo.synthetic import SyntheticConfig, SyntheticSite
from events.base import Event
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch


@pytest.fixture(scope="session")
def site() -> tuple[SyntheticSite, list[Event]]:
    """~300 studies over 12 weeks (drift from week 8), all three pipelines."""
    s = SyntheticSite(SyntheticConfig(seed=11, studies=300, weeks=12, drift_week=8))
    return s, list(s.events())


@pytest.fixture(scope="session")
def site_events(site: tuple[SyntheticSite, list[Event]]) -> list[Event]:
    return site[1]


@pytest.fixture
def folded(site_events: list[Event]) -> Iterator[ProjectionStore]:
    """The site's events folded into an in-memory read model, in batches of 500."""
    store = ProjectionStore(":memory:")
    for i in range(0, len(site_events), 500):
        store.apply(RowBatch().extend(enumerate(site_events[i:i + 500], i + 1)))
    try:
        yield store
    finally:
        store.close()
