"""``lastmile bench events``: publish and consume N events against a real JetStream file store,
through our codec and adapter and, in the same run, through a plain nats-py loop (the peer).

Both sides send bodies of the same size to the same kind of stream on the same server,
so the ratio is what our envelope, codec, de-duplication header and dead-letter-aware
consumer cost.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from events.base import Event
from events.catalogue import InferenceRequested, Stage
from events.codec import encode
from events.jetstream import BusSettings, Delivery, EventBus
from events.nats_server import EmbeddedNats, free_port


@dataclass
class EventsBench:
    count: int
    event_bytes: int
    sync: str
    lastmile_publish_per_s: float
    lastmile_consume_per_s: float
    plain_publish_per_s: float
    plain_consume_per_s: float
    plain_dedupe_publish_per_s: float
    plain_dedupe_consume_per_s: float
    publish_ratio: float
    consume_ratio: float
    server: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


EVENTS_PER_STUDY = 50  # a study yields tens to hundreds of events (one per instance and more)


def _events(n: int) -> list[Event]:
    """Events of ``n // 50`` studies: each study has its own subjects, as in real use."""
    return [
        InferenceRequested.new(
            actor="bench",
            study_uid=f"1.2.826.0.1.3680043.8.498.{i // EVENTS_PER_STUDY}",
            pipeline="bts",
            run_key=f"bench-{i:08d}",
            model_sha256="9f" * 8,
            stage=Stage.SILENT,
        )
        for i in range(n)
    ]


async def _plain(url: str, bodies: list[bytes], ids: list[str] | None,
                 name: str) -> tuple[float, float]:
    """The peer: nats-py publish_async with acks gathered per 1000, fetch(1000) + ack.

    With ``ids``, each message also carries ``Nats-Msg-Id`` (JetStream de-duplication),
    which isolates what de-duplication costs from what our codec costs."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = name.lower()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{subject}.>"],
                                     storage=StorageType.FILE, duplicate_window=120.0))
    t0 = time.perf_counter()
    futs = []
    for i, body in enumerate(bodies):
        headers = {"Nats-Msg-Id": ids[i]} if ids else None
        futs.append(await js.publish_async(f"{subject}.{i % 64}", body, headers=headers))
        if len(futs) >= 1000:
            await asyncio.gather(*futs)
            futs.clear()
    await asyncio.gather(*futs)
    pub = len(bodies) / (time.perf_counter() - t0)

    sub = await js.pull_subscribe(f"{subject}.>", durable=subject, stream=name,
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
    got = 0
    t0 = time.perf_counter()
    while got < len(bodies):
        for msg in await sub.fetch(1000, timeout=5):
            await msg.ack()
            got += 1
    con = got / (time.perf_counter() - t0)
    await nc.close()
    return pub, con


async def _ours(url: str, events: list[Event]) -> tuple[float, float]:
    bus = await EventBus.connect(BusSettings(servers=(url,)))
    t0 = time.perf_counter()
    stored = await bus.publish_many(events)
    pub = len(events) / (time.perf_counter() - t0)
    assert stored == len(events), f"stored {stored} of {len(events)}"

    stop = asyncio.Event()
    got = 0

    async def handle(event: Event, delivery: Delivery) -> None:
        nonlocal got
        got += 1
        if got >= len(events):
            stop.set()

    t0 = time.perf_counter()
    await bus.consume("bench", handle, batch=1000, stop=stop, idle_timeout_s=5)
    con = got / (time.perf_counter() - t0)
    await bus.close()
    return pub, con


async def run_events_bench(count: int = 100_000, sync: str = "2m") -> EventsBench:
    """Always on a fresh embedded server in a temp dir: never writes bench events
    into a site's real log."""
    events = _events(count)
    bodies = [encode(e)[1] for e in events]
    event_bytes = sum(len(b) for b in bodies) // max(1, len(bodies))
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-") as tmp:
        with EmbeddedNats(Path(tmp) / "nats", port=free_port(), sync=sync) as server:
            # peer first, then ours, on the same server and store
            plain_pub, plain_con = await _plain(server.url, bodies, None, "PLAIN")
            dedupe_pub, dedupe_con = await _plain(server.url, bodies,
                                                  [e.event_id for e in events], "PLAINID")
            our_pub, our_con = await _ours(server.url, events)
    return EventsBench(
        count=count,
        event_bytes=event_bytes,
        sync=sync,
        lastmile_publish_per_s=round(our_pub),
        lastmile_consume_per_s=round(our_con),
        plain_publish_per_s=round(plain_pub),
        plain_consume_per_s=round(plain_con),
        plain_dedupe_publish_per_s=round(dedupe_pub),
        plain_dedupe_consume_per_s=round(dedupe_con),
        publish_ratio=round(our_pub / plain_pub, 3),
        consume_ratio=round(our_con / plain_con, 3),
        server="embedded nats-server, JetStream file store in a fresh temp dir",
    )
