"""Results that did not reach the PACS are sent again from the log, until they arrive.

The worker C-STOREs a run's SEG/SR to the pipeline's PACS with the few quick retries its
pipeline file allows. When those run out (a PACS down for maintenance, a network outage)
it records ``PublishFailed(will_retry=True, address=AE@host:port)`` and moves on to the
next study. This durable consumer (``pacs-redelivery``) reads every
``engine.inference.completed``, finds the PACS destinations of that run that failed and
have not been published since, and sends the missing files again from ``results_dir``
with exponential backoff (one attempt per delivery, heartbeats while it waits), so a
PACS that is down for an hour still gets every result once it is back. Each failed
attempt is a ``PublishFailed`` event; success is the same ``ResultPublished`` events the
worker would have written (same deterministic ids, so nothing is published twice in the
log). After ``max_deliveries`` the trigger is dead-lettered with the last error, visible
in ``lastmile audit`` and the reliability dashboard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from engine import pacs
from engine.errors import EngineError, PublishFailedError, safe_reason
from events.base import Event, deterministic_id
from events.catalogue import InferenceCompleted, PublishFailed, ResultPublished
from events.jetstream import Delivery, EventBus
from events.subjects import type_filter

log = logging.getLogger(__name__)

DURABLE = "pacs-redelivery"


@dataclass(frozen=True)
class ResultFile:
    kind: str  # "SEG" | "SR"
    sop_instance_uid: str
    key: str  # relative to results_dir


def result_files(result_keys: Sequence[str]) -> list[ResultFile]:
    """The worker names results ``<run>/<kind>-<SOPInstanceUID>.dcm``."""
    out = []
    for key in result_keys:
        name = Path(key).name
        kind, sep, rest = name.partition("-")
        if sep and rest.endswith(".dcm") and kind in ("seg", "sr"):
            out.append(ResultFile(kind.upper(), rest[: -len(".dcm")], key))
    return out


@dataclass(frozen=True)
class Pending:
    """One PACS destination of a run that still lacks some of the run's files."""

    destination: str  # "pacs:AE"
    address: str  # "AE@host:port"
    files: tuple[ResultFile, ...]
    attempts_so_far: int


def outcome_events(make: Callable[..., Event], key: str, destination: str, address: str,
                   outcomes: Sequence[pacs.StoreOutcome], kinds: dict[str, str],
                   attempt: int | None = None) -> list[Event]:
    """The log's record of what a PACS decided per object: ``ResultPublished`` for each
    stored, ``PublishFailed(refused=True, will_retry=False, status=…)`` for each refused.
    ``make(cls, event_id, **payload)`` builds an event caused by the run's trigger; ids
    are deterministic, so the worker and this consumer never record one twice."""
    out = []
    for o in outcomes:
        kind = kinds.get(o.sop_instance_uid, "")
        if o.refused:
            out.append(make(
                PublishFailed,
                deterministic_id("publish-refused", key, destination, o.sop_instance_uid),
                run_key=key, destination=destination, attempt=attempt or o.attempt,
                error=f"refused by {destination}: {o.status} ({o.status_hex}) for the "
                      f"{kind or 'result'}; not retried",
                will_retry=False, address=address, refused=True,
                status=o.code if o.code >= 0 else None,
                sop_instance_uid=o.sop_instance_uid, kind=kind or None))
        else:
            out.append(make(
                ResultPublished,
                deterministic_id("published", key, destination, o.sop_instance_uid),
                run_key=key, destination=destination, kind=kind,
                sop_instance_uid=o.sop_instance_uid, attempt=attempt or o.attempt))
    return out


def pending(run: InferenceCompleted, history: Sequence[Event]) -> list[Pending]:
    """Pure: which PACS destinations of ``run`` failed and still miss files (an object
    refused by the PACS is not missing: it is never sent again)."""
    failed: dict[str, PublishFailed] = {}
    published: dict[str, set[str]] = {}
    for ev in history:
        if isinstance(ev, PublishFailed) and ev.refused and ev.run_key == run.run_key \
                and ev.sop_instance_uid:
            published.setdefault(ev.destination, set()).add(ev.sop_instance_uid)
        elif isinstance(ev, PublishFailed) and ev.run_key == run.run_key \
                and ev.destination.startswith("pacs:") and ev.address:
            if ev.destination not in failed or ev.attempt >= failed[ev.destination].attempt:
                failed[ev.destination] = ev
        elif isinstance(ev, ResultPublished) and ev.run_key == run.run_key \
                and ev.sop_instance_uid:
            published.setdefault(ev.destination, set()).add(ev.sop_instance_uid)
    files = result_files(run.result_keys)
    out = []
    for dest, last in sorted(failed.items()):
        missing = tuple(f for f in files
                        if f.sop_instance_uid not in published.get(dest, set()))
        if missing and last.will_retry:
            assert last.address is not None
            out.append(Pending(dest, last.address, missing, last.attempt))
    return out


@dataclass(frozen=True)
class RedeliveryConfig:
    results_dir: Path
    actor: str = "pacs-redelivery"
    calling_ae: str = "LASTMILE"
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    max_deliveries: int = 120  # with the 60 s cap: about two hours of trying
    heartbeat_s: float = 5.0
    timeout_s: float = 30.0


class PacsRedelivery:
    """The ``engine.inference.completed`` handler that finishes failed PACS deliveries."""

    def __init__(self, config: RedeliveryConfig) -> None:
        self.config = config
        self._bus: EventBus | None = None

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        self._bus = bus
        await bus.consume(DURABLE, self.handle,
                          filter_subjects=[type_filter("engine.inference.completed")],
                          max_attempts=self.config.max_deliveries, ack_wait_s=30.0, stop=stop)

    def delay(self, attempt: int) -> float:
        return float(min(self.config.backoff_s * 2 ** max(0, attempt - 1),
                         self.config.max_backoff_s))

    async def handle(self, event: Event, delivery: Delivery) -> None:
        if not isinstance(event, InferenceCompleted) or not event.study_uid:
            return
        assert self._bus is not None, "bind with run()"
        bus = self._bus
        history = [e for _, e in await bus.history(event.study_uid)]
        todo = pending(event, history)
        errors = []

        def make(cls: type[Event], event_id: str, **payload: object) -> Event:
            return event.caused(cls, actor=self.config.actor, event_id=event_id, **payload)

        for p in todo:
            attempt = p.attempts_so_far + 1
            kinds = {f.sop_instance_uid: f.kind for f in p.files}
            try:
                outcomes = await self._send(p, delivery)
            except (PublishFailedError, OSError, EngineError) as exc:
                decided = getattr(exc, "outcomes", [])
                if decided:
                    await bus.publish_many(outcome_events(make, event.run_key, p.destination,
                                                          p.address, decided, kinds, attempt))
                final = delivery.attempt >= delivery.max_attempts
                await bus.publish(event.caused(
                    PublishFailed, actor=self.config.actor,
                    event_id=deterministic_id("publish-failed", event.run_key, p.destination,
                                              attempt),
                    run_key=event.run_key, destination=p.destination,
                    error=safe_reason(exc)[:2000],
                    attempt=attempt, will_retry=not final, address=p.address))
                log.warning("run %s: PACS %s still unreachable (attempt %d): %s",
                            event.run_key, p.destination, attempt, safe_reason(exc))
                errors.append(f"{p.destination}: {safe_reason(exc)}")
                continue
            await bus.publish_many(outcome_events(make, event.run_key, p.destination,
                                                  p.address, outcomes, kinds, attempt))
            refused = sum(o.refused for o in outcomes)
            log.info("run %s: %d result(s) delivered to %s on attempt %d, %d refused",
                     event.run_key, len(outcomes) - refused, p.destination, attempt, refused)
        if errors:
            if delivery.attempt < delivery.max_attempts:
                await self._wait(self.delay(delivery.attempt), delivery)
            # the log redelivers the trigger; after the limit it is dead-lettered with this
            raise PublishFailedError("; ".join(errors))

    async def _send(self, p: Pending, delivery: Delivery) -> list[pacs.StoreOutcome]:
        dest = pacs.parse_address(p.address, self.config.calling_ae)

        def send() -> list[pacs.StoreOutcome]:
            datasets = [pydicom.dcmread(self.config.results_dir / f.key) for f in p.files]
            return pacs.c_store(datasets, dest, retries=0, timeout_s=self.config.timeout_s)

        task = asyncio.ensure_future(asyncio.to_thread(send))
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.config.heartbeat_s)
            if done:
                return await task
            await delivery.in_progress()

    async def _wait(self, seconds: float, delivery: Delivery) -> None:
        """Back off without being redelivered meanwhile."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(left, self.config.heartbeat_s))
            await delivery.in_progress()
