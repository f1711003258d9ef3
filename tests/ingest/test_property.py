"""Property: whatever bytes arrive, the store-and-publish path answers a named status,
records it in JetStream, and leaves the store consistent (no partial file, every file
named by its hash and announced by an event)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from events.catalogue import InstanceDuplicated, InstanceRejected, InstanceStored
from events.instance_store import InstanceStore
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats
from ingest.jetstream import ThreadPublisher
from ingest.receiver import InstanceReceiver, Received
from ingest.rules import default_rules
from ingest.statuses import StoreStatus
from tests.ingest.conftest import SECRET
from tests.ingest.test_store_and_dataset import dataset_bytes

pytestmark = pytest.mark.server

CT = get_testdata_file("CT_small.dcm")
DATASET, TS = dataset_bytes(CT)
HEADER = pydicom.dcmread(CT, stop_before_pixels=True)


class LoopThread:
    """An event loop in a thread, so synchronous code (like pynetdicom's) can publish."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def threaded(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[tuple[LoopThread, EventBus]]:
    lt = LoopThread()
    bus = lt.run(EventBus.connect(BusSettings(servers=(nats_server.url,), stream="PROP")))
    yield lt, bus
    lt.run(bus.js.delete_stream("PROP"))
    lt.run(bus.close())
    lt.close()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(DATASET)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "garbage", "intact"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return bytes(data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:])
    if kind == "garbage":
        return draw(st.binary(max_size=2048))
    return bytes(data)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=mutated())
def test_mutated_bytes_get_a_named_status_an_event_and_a_consistent_store(
    threaded: tuple[LoopThread, EventBus], tmp_path: Path, payload: bytes,
) -> None:
    lt, bus = threaded
    store = InstanceStore(tmp_path / "store")
    receiver = InstanceReceiver(store, ThreadPublisher(bus, lt.loop), SECRET, default_rules)
    before = lt.run(bus.last_sequence())
    outcome = receiver.receive(Received(
        dataset=payload, transfer_syntax_uid=TS, sop_class_uid=str(HEADER.SOPClassUID),
        sop_instance_uid=str(HEADER.SOPInstanceUID), calling_ae="FUZZ", called_ae="LM_LTS",
    ))
    assert isinstance(outcome.status, StoreStatus)
    assert outcome.events, "every outcome is recorded"
    assert lt.run(bus.last_sequence()) >= before + (0 if isinstance(
        outcome.events[-1], InstanceDuplicated | InstanceStored) else 1)
    last = outcome.events[-1]
    if outcome.status is StoreStatus.SUCCESS:
        assert isinstance(last, InstanceStored | InstanceDuplicated)
    else:
        assert isinstance(last, InstanceRejected)
        assert last.status == outcome.status and last.status_name == outcome.status.name
    assert store.leftovers() == []
    # every file in the store is named by its hash and announced by an InstanceStored
    announced = {ev.store_key for ev in receiver_history(lt, bus)}
    for path in (tmp_path / "store").glob("*/*.dcm"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem
        assert str(path.relative_to(tmp_path / "store")) in announced


def receiver_history(lt: LoopThread, bus: EventBus) -> list[InstanceStored]:
    async def read() -> list[InstanceStored]:
        return [ev async for _, ev, _ in bus.read() if isinstance(ev, InstanceStored)]
    result: list[InstanceStored] = lt.run(read())
    return result
