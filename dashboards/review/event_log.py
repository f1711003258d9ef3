"""The review pages' NATS edge: one study's history (the case, read from the log so a
submit is checked against every fact, not a lagging read model) and publishing the facts
people make (reviews, QC decisions, edits).

Streamlit runs page scripts on a worker thread without an event loop; each call runs a
short ``asyncio.run`` with its own connection, as ``dashboards.event_log`` does.
"""

from __future__ import annotations

import asyncio

from events.base import Event
from events.jetstream import BusSettings, EventBus, Published


async def _history(settings: BusSettings, study_uid: str) -> tuple[list[Event], int]:
    bus = await EventBus.connect(settings, ensure_stream=False)
    try:
        pairs = await bus.history(study_uid)
        return [e for _, e in pairs], max((s for s, _ in pairs), default=0)
    finally:
        await bus.close()


def study_events(settings: BusSettings, study_uid: str) -> tuple[list[Event], int]:
    """Every decodable event of the study, in log order, and the last sequence seen."""
    return asyncio.run(_history(settings, study_uid))


async def _publish(settings: BusSettings, event: Event) -> Published:
    bus = await EventBus.connect(settings, ensure_stream=False)
    try:
        return await bus.publish(event)
    finally:
        await bus.close()


def publish(settings: BusSettings, event: Event) -> Published:
    """Publish and wait for JetStream's ack (a duplicate id is stored once)."""
    return asyncio.run(_publish(settings, event))
