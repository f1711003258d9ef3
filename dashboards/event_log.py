"""The dashboards' NATS edge: one study's full event history (Audit) and the pipeline
events with who deployed what and its model card (Models).

The read model keeps rows, not whole events, so the complete, expandable record of
a study comes from the log itself (``EventBus.history`` reads only that study's
subject). Streamlit runs page scripts on a worker thread without an event loop, so
each call runs its own short ``asyncio.run`` and closes the connection.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.base import Event
from events.catalogue import PipelineDeployed, PipelineRetired, PipelineStageChanged
from events.codec import to_builtins
from events.jetstream import BusSettings, EventBus

PIPELINE_SUBJECT = "lm.ev._.engine.pipeline.>"
MAX_CARD_BYTES = 256_000


@dataclass(frozen=True)
class LoggedEvent:
    """One event as the Audit page shows it (plain values, cacheable)."""

    sequence: int
    type: str
    occurred_at: str
    actor: str
    pipeline: str | None
    body: dict[str, Any]


def _logged(seq: int, ev: Event) -> LoggedEvent:
    body = to_builtins(ev)
    return LoggedEvent(seq, ev.type_name(), ev.occurred_at.isoformat(), ev.actor, ev.pipeline,
                       body)


async def _history(bus_settings: BusSettings, study_uid: str) -> list[LoggedEvent]:
    bus = await EventBus.connect(bus_settings, ensure_stream=False)
    try:
        return [_logged(s, e) for s, e in await bus.history(study_uid)]
    finally:
        await bus.close()


def study_history(bus_settings: BusSettings, study_uid: str) -> list[LoggedEvent]:
    """Every decodable event of one study, in log order."""
    return asyncio.run(_history(bus_settings, study_uid))


def history_json(study_uid: str, events: list[LoggedEvent]) -> str:
    """The study's history as downloaded from the Audit page (same shape as
    `lastmile audit --json`: a list of events, each with its stream sequence)."""
    return json.dumps([{"sequence": e.sequence, **e.body} for e in events], indent=1)


@dataclass(frozen=True)
class PipelineEvent:
    sequence: int
    occurred_at: str
    kind: str  # deployed | stage_changed | retired
    name: str
    version: str
    actor: str
    stage: str | None
    from_stage: str | None
    reason: str | None
    model_sha256: str | None
    model_card_path: str | None
    model_card: str | None  # the card's text when the file is readable here


def read_card(path: str | None) -> str | None:
    """A model card named by a deployment, if it is a readable Markdown file here."""
    if not path:
        return None
    p = Path(path)
    try:
        if p.suffix.lower() not in (".md", ".markdown", ".txt") or not p.is_file() \
                or p.stat().st_size > MAX_CARD_BYTES:
            return None
        return p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _pipeline_event(seq: int, ev: Event) -> PipelineEvent | None:
    when = ev.occurred_at.isoformat()
    if isinstance(ev, PipelineDeployed):
        return PipelineEvent(seq, when, "deployed", ev.name, ev.version, ev.actor,
                             str(ev.stage), None, ev.reason, ev.model_sha256, ev.model_card,
                             read_card(ev.model_card))
    if isinstance(ev, PipelineStageChanged):
        return PipelineEvent(seq, when, "stage_changed", ev.name, ev.version, ev.actor,
                             str(ev.to_stage), str(ev.from_stage), ev.reason, None, None, None)
    if isinstance(ev, PipelineRetired):
        return PipelineEvent(seq, when, "retired", ev.name, ev.version, ev.actor, None, None,
                             ev.reason, None, None, None)
    return None


async def _pipeline_events(bus_settings: BusSettings, up_to: int) -> list[PipelineEvent]:
    bus = await EventBus.connect(bus_settings, ensure_stream=False)
    try:
        out = []
        async for seq, ev, _ in bus.read(filter_subject=PIPELINE_SUBJECT, to_sequence=up_to
                                         or None):
            if isinstance(ev, Event) and (pe := _pipeline_event(seq, ev)) is not None:
                out.append(pe)
        return out
    finally:
        await bus.close()


def pipeline_events(bus_settings: BusSettings, up_to: int = 0) -> list[PipelineEvent]:
    """Deployments, stage changes and retirements with actor and model card, in log order
    (up to sequence ``up_to`` when given, so the page matches the read model)."""
    return asyncio.run(_pipeline_events(bus_settings, up_to))
