"""The JetStream adapter: the stream, publishing with de-duplication, durable consumers.

Everything that talks to NATS lives here. The rest of Lastmile sees ``EventBus``:

- ``ensure_stream()`` creates or updates the stream from ``BusSettings`` (idempotent).
- ``publish(event)`` waits for JetStream's ack; ``Nats-Msg-Id`` = event id, so a
  re-publish inside the duplicate window stores nothing new. Retries with backoff
  while the server is unreachable, for at most ``publish_retry_s``, then raises.
- ``publish_many(events)`` publishes asynchronously and gathers acks in windows
  (the bulk path: imports, benchmarks, the demo).
- ``consume(...)`` runs a durable pull consumer with explicit acks, ack-wait and a
  delivery limit; a message that cannot be handled is dead-lettered as a
  ``system.delivery.failed`` event that says why, and the consumer goes on.
- ``read(...)`` reads the log (all, or one study, from a sequence) without a
  durable consumer: what audit, replay and projections use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from events.base import Event, deterministic_id
from events.catalogue import DeliveryFailed
from events.codec import decode, encode
from events.errors import BusUnavailable, CodecError, PublishError, Unprocessable
from events.subjects import ALL_EVENTS, study_filter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BusSettings:
    """How to reach NATS and how the event stream is configured."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    stream: str = "LASTMILE"
    replicas: int = 1
    duplicate_window_s: float = 120.0
    max_age_s: float = 0.0  # 0 = keep forever: the log is the source of truth
    max_bytes: int = -1  # -1 = unlimited; when set, new writes are refused, old never dropped
    connect_timeout_s: float = 2.0
    publish_timeout_s: float = 5.0
    publish_retry_s: float = 30.0
    #: a read fails (``BusUnavailable``) when matching messages are pending but none
    #: arrive for this long; an empty fetch alone never ends a read early
    read_stall_s: float = 30.0
    name: str = "lastmile"

    def display_url(self) -> str:
        return ", ".join(self.servers)


@dataclass(frozen=True)
class Published:
    sequence: int
    duplicate: bool


@dataclass
class Delivery:
    """What a handler knows about the message it is handling."""

    sequence: int
    subject: str
    attempt: int
    max_attempts: int
    _msg: Msg = field(repr=False)

    async def in_progress(self) -> None:
        """Tell JetStream the work is alive, so it is not redelivered (long inferences)."""
        await self._msg.in_progress()


Handler = Callable[[Event, Delivery], Awaitable[None]]


def _tls_context(s: BusSettings) -> ssl.SSLContext | None:
    if not (s.tls_ca or s.tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=s.tls_ca)
    if s.tls_cert:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
    return ctx


def stream_config(s: BusSettings) -> StreamConfig:
    return StreamConfig(
        name=s.stream,
        description="Lastmile event log: every fact, written once",
        subjects=[ALL_EVENTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=s.replicas,
        duplicate_window=s.duplicate_window_s,
        max_age=s.max_age_s,
        max_bytes=s.max_bytes,
        discard=DiscardPolicy.NEW,
        allow_direct=True,
    )


class EventBus:
    """A connection to NATS and the Lastmile stream."""

    def __init__(self, nc: NATS, settings: BusSettings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=settings.publish_timeout_s)
        self.settings = settings
        self._conn_log = _ConnectionLog()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(cls, settings: BusSettings, *, ensure_stream: bool = True) -> EventBus:
        """Connect, or raise ``BusUnavailable`` naming the URL and what to try."""
        options: dict[str, Any] = {
            "servers": list(settings.servers),
            "name": settings.name,
            "connect_timeout": settings.connect_timeout_s,
            "allow_reconnect": True,
            # a few quick tries at start (so a wrong URL fails fast and clearly);
            # unlimited once connected, see below
            "max_reconnect_attempts": 2,
            "reconnect_time_wait": 0.5,
            "drain_timeout": 5,
        }
        conn_log = _ConnectionLog()
        options.update(conn_log.callbacks())
        if settings.user:
            options["user"] = settings.user
            options["password"] = settings.password
        if settings.creds_file:
            options["user_credentials"] = settings.creds_file
        tls = _tls_context(settings)
        if tls is not None:
            options["tls"] = tls
        try:
            nc = await asyncio.wait_for(
                nats.connect(**options),
                timeout=settings.connect_timeout_s * 3 + 1,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            advice = conn_log.advice()
            raise BusUnavailable(
                f"cannot reach NATS at {settings.display_url()} ({type(exc).__name__}: {exc})."
                + (advice or " Start the embedded server with `lastmile up`, or point "
                   "--nats-url (LASTMILE_NATS_URL) at a running server with JetStream enabled.")
            ) from None
        nc.options["max_reconnect_attempts"] = -1  # keep reconnecting while running
        conn_log.connected = True
        bus = cls(nc, settings)
        bus._conn_log = conn_log
        if ensure_stream:
            await bus.ensure_stream()
        return bus

    async def close(self) -> None:
        self._conn_log.connected = False  # a deliberate close is not worth a warning
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (nats.errors.Error, TimeoutError, OSError):
                with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                    await self.nc.close()

    async def __aenter__(self) -> EventBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ensure_stream(self) -> None:
        """Create the stream, or bring an existing one to the configured settings."""
        config = stream_config(self.settings)
        try:
            await self.js.stream_info(config.name or "")
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
            return
        except nats.js.errors.ServiceUnavailableError as exc:
            raise BusUnavailable(
                f"NATS at {self.settings.display_url()} has JetStream disabled or unavailable "
                f"({exc}); start nats-server with -js"
            ) from None
        await self.js.update_stream(config)

    async def last_sequence(self) -> int:
        info = await self.js.stream_info(self.settings.stream)
        return int(info.state.last_seq)

    async def subject_count(self, filter_subject: str) -> int:
        """How many messages the stream holds on subjects matching ``filter_subject``
        (one STREAM.INFO request: a cheap "did anything change?" before a read)."""
        info = await self.js.stream_info(self.settings.stream, subjects_filter=filter_subject)
        return sum(int(n) for n in (info.state.subjects or {}).values())

    # ------------------------------------------------------------------ publishing

    async def publish(self, event: Event, *, retry_s: float | None = None) -> Published:
        """Publish and wait for the ack. Idempotent by event id. ``retry_s`` overrides the
        settings' retry budget (the DICOM receiver's sender is waiting on it)."""
        subject, body, headers = encode(event)
        delay = 0.05
        loop = asyncio.get_running_loop()
        budget = self.settings.publish_retry_s if retry_s is None else retry_s
        deadline = loop.time() + budget
        while True:
            try:
                # each attempt's wait ends with the budget (a sender may be waiting)
                wait = max(0.05, min(self.settings.publish_timeout_s, deadline - loop.time()))
                ack = await self.js.publish(subject, body, timeout=wait, headers=headers)
                return Published(ack.seq, bool(ack.duplicate))
            except (
                TimeoutError,
                ConnectionError,
                nats.errors.TimeoutError,
                nats.errors.ConnectionClosedError,
                nats.errors.OutboundBufferLimitError,
                nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError,
                nats.js.errors.ServiceUnavailableError,
            ) as exc:
                if subject in self._conn_log.denied:
                    raise PublishError(
                        f"NATS user {self.settings.user or '(none)'} may not publish "
                        f"{event.type_name()} ({subject}): permissions violation; the event "
                        "was not recorded") from None
                if loop.time() + delay > deadline or self.nc.is_closed:
                    raise PublishError(
                        f"JetStream at {self.settings.display_url()} did not acknowledge "
                        f"{event.type_name()} {event.event_id} within "
                        f"{budget:.0f}s ({type(exc).__name__}); "
                        "the event was not recorded: check that nats-server is running"
                    ) from None
                log.warning("publish retry in %.2fs (%s)", delay, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except nats.js.errors.APIError as exc:
                raise PublishError(
                    f"JetStream refused {event.type_name()} {event.event_id}: {exc}"
                ) from None

    async def publish_many(self, events: Iterable[Event], *, window: int = 1000) -> int:
        """Bulk publish: async publishes, acks gathered every ``window`` messages.

        Returns how many were stored new (duplicates excluded). Raises
        ``PublishError`` if any was not acknowledged; re-running the same call is
        safe (ids de-duplicate).
        """
        stored = 0
        pending: list[asyncio.Future[Any]] = []

        async def gather() -> int:
            new = 0
            results = await asyncio.gather(*pending, return_exceptions=True)
            pending.clear()
            for r in results:
                if isinstance(r, BaseException):
                    raise PublishError(f"bulk publish not acknowledged: {r!r}")
                new += 0 if r.duplicate else 1
            return new

        for event in events:
            subject, body, headers = encode(event)
            pending.append(await self.js.publish_async(subject, body, headers=headers))
            if len(pending) >= window:
                stored += await gather()
        if pending:
            stored += await gather()
        return stored

    # ------------------------------------------------------------------ reading

    async def read(
        self,
        *,
        study_uid: str | None = None,
        filter_subject: str | None = None,
        from_sequence: int = 1,
        batch: int = 1000,
        to_sequence: int | None = None,
    ) -> AsyncIterator[tuple[int, Event | CodecError, Msg]]:
        """Yield (stream sequence, event or decoding error, raw msg) in log order.

        Stops at the end of the log as it was when reading began (or at
        ``to_sequence``). ``study_uid`` narrows to one study's subject, so an audit
        reads only that study's messages.
        """
        subject = filter_subject or (study_filter(study_uid) if study_uid else ALL_EVENTS)
        end = to_sequence if to_sequence is not None else await self.last_sequence()
        position = max(1, from_sequence)  # the next sequence not yet yielded
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.read_stall_s
        again = False
        while position <= end:
            # The store says where the next matching message is (one request): nothing
            # matching → done at once, without a consumer or a fetch timeout. After a
            # consumer went quiet this is what decides whether that was the end. A
            # consumer's own view is not trusted for it: on a server that had just started,
            # a new filtered consumer delivered nothing and reported nothing pending while
            # 584 matching messages were stored, and the receiver's instance index was
            # rebuilt from 0 events (the next sends were stored again, not duplicates).
            nxt = await self._next_matching(subject, position)
            if nxt is None or nxt > end:
                return
            if again:
                if loop.time() > deadline:
                    raise BusUnavailable(
                        f"reading the log stalled: message #{nxt} on {subject} is stored "
                        f"but was not delivered in {self.settings.read_stall_s:.0f} s")
                log.warning("a read of %s stopped short of stored message #%d; reading "
                            "again from there", subject, nxt)
            again, position = True, nxt
            sub = await self._read_consumer(subject, position)
            try:
                drained = False  # the consumer says nothing more matches
                while not drained:
                    try:
                        msgs = await sub.fetch(batch, timeout=1.0)
                    except (TimeoutError, nats.errors.TimeoutError):
                        break  # asked below whether that really was the end
                    deadline = loop.time() + self.settings.read_stall_s
                    for msg in msgs:
                        meta = msg.metadata
                        seq = int(meta.sequence.stream)
                        if seq > end:
                            return
                        try:
                            item: Event | CodecError = decode(msg.data, msg.headers)
                        except CodecError as exc:
                            item = exc
                        yield seq, item, msg
                        position = seq + 1
                        if seq >= end:
                            return
                        drained = meta.num_pending == 0
            finally:
                await self._drop_consumer(sub)

    async def _read_consumer(self, subject: str, start: int) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            filter_subject=subject,
            inactive_threshold=30.0,
            max_waiting=1,
            headers_only=False,
        )
        return await self.js.pull_subscribe(subject, stream=self.settings.stream, config=config)

    async def _drop_consumer(self, sub: JetStreamContext.PullSubscription) -> None:
        """Unsubscribe and delete the read's consumer at once (left to its inactivity
        threshold, hundreds accumulate and are recovered at every server start)."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await sub.unsubscribe()
        name = getattr(sub, "_consumer", None)  # nats-py keeps the name it chose here
        if name:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self.js.delete_consumer(self.settings.stream, name)

    async def _next_matching(self, subject: str, sequence: int) -> int | None:
        """The stream sequence of the first stored message on ``subject`` at or after
        ``sequence`` (one STREAM.MSG.GET, answered from the store), or None."""
        try:
            raw = await self.js.get_msg(self.settings.stream, seq=sequence, subject=subject,
                                        next=True)
        except nats.js.errors.NotFoundError:
            return None
        return int(raw.seq) if raw.seq is not None else None

    async def history(self, study_uid: str) -> list[tuple[int, Event]]:
        """Every decodable event of one study, in order."""
        return [
            (seq, ev)
            async for seq, ev, _ in self.read(study_uid=study_uid)
            if isinstance(ev, Event)
        ]

    # ------------------------------------------------------------------ consuming

    async def consume(
        self,
        durable: str,
        handler: Handler,
        *,
        filter_subjects: Sequence[str] = (ALL_EVENTS,),
        max_attempts: int = 5,
        ack_wait_s: float = 30.0,
        batch: int = 100,
        stop: asyncio.Event | None = None,
        idle_timeout_s: float = 1.0,
        linger_s: float = 0.0,
    ) -> None:
        """Run a durable pull consumer until ``stop`` is set.

        ``linger_s`` > 0 lets a consumer that tolerates that much delay collect messages
        between fetches instead of fetching each one as it arrives (the completion
        detector does: one fetch per instance costs the SCP ~15% of its throughput).

        Each message is decoded and handed to ``handler``; success acks it. A handler
        error naks it with backoff until ``max_attempts``, then it is dead-lettered; an
        ``Unprocessable`` error is dead-lettered at once (bad input, not bad luck).
        A message that is not a valid event is dead-lettered at once. A message whose
        consumer died without acking is redelivered after ``ack_wait_s``; one that
        exceeds ``max_attempts`` that way is dead-lettered as well. Several processes
        may run the same ``durable``: JetStream shares the messages among them.
        """
        sub = await self.durable(durable, filter_subjects, max_attempts, ack_wait_s)
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(batch, timeout=idle_timeout_s)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                for msg in msgs:
                    await self._deliver(durable, msg, handler, max_attempts)
                if linger_s > 0 and len(msgs) < batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), linger_s)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def durable(
        self,
        durable: str,
        filter_subjects: Sequence[str],
        max_attempts: int,
        ack_wait_s: float,
    ) -> JetStreamContext.PullSubscription:
        """Create or update a durable pull consumer and bind to it."""
        subjects = list(filter_subjects)
        config = ConsumerConfig(
            durable_name=durable,
            name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            # one delivery more than the handler gets, so a message whose consumer
            # crashed every time still reaches us once more to be dead-lettered
            max_deliver=max_attempts + 1,
            max_ack_pending=1000,
        )
        if len(subjects) == 1:
            config.filter_subject = subjects[0]
        else:
            config.filter_subjects = subjects
        await self.js.add_consumer(self.settings.stream, config=config)
        return await self.js.pull_subscribe_bind(durable=durable, stream=self.settings.stream)

    async def _deliver(self, consumer: str, msg: Msg, handler: Handler, max_attempts: int) -> None:
        seq, attempt = _ack_info(msg)
        try:
            event = decode(msg.data, msg.headers)
        except CodecError as exc:
            await self._dead_letter(consumer, msg, None, attempt, f"undecodable: {exc}")
            return
        if attempt > max_attempts:
            await self._dead_letter(
                consumer,
                msg,
                event,
                attempt - 1,
                f"not acknowledged after {max_attempts} deliveries (the consumer died or "
                "exceeded its ack wait each time)",
            )
            return
        delivery = Delivery(seq, msg.subject, attempt, max_attempts, msg)
        try:
            await handler(event, delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the consumer is a top loop: never die
            reason = f"{type(exc).__name__}: {exc}"
            if attempt >= max_attempts or isinstance(exc, Unprocessable):
                await self._dead_letter(consumer, msg, event, attempt, reason)
            else:
                log.warning(
                    "%s: %s seq=%d attempt %d/%d failed: %s",
                    consumer,
                    event.type_name(),
                    seq,
                    attempt,
                    max_attempts,
                    reason,
                )
                await msg.nak(delay=min(0.2 * 2**attempt, 10.0))
            return
        await msg.ack()

    async def _dead_letter(
        self, consumer: str, msg: Msg, event: Event | None, deliveries: int, reason: str
    ) -> None:
        seq, _ = _ack_info(msg)
        dead = DeliveryFailed.new(
            event_id=deterministic_id("dead-letter", self.settings.stream, consumer, seq),
            actor=f"consumer:{consumer}",
            study_uid=event.study_uid if event else None,
            pipeline=event.pipeline if event else None,
            causation_id=event.event_id if event else None,
            correlation_id=event.correlation_id if event else None,
            consumer=consumer,
            subject=msg.subject,
            stream_sequence=seq,
            deliveries=deliveries,
            reason=reason[:2000],
            original_type=event.type_name() if event else _type_from_subject(msg.subject),
            original_event_id=event.event_id if event else None,
            payload_sha256=hashlib.sha256(msg.data).hexdigest(),
            payload_size=len(msg.data),
        )
        if event is not None and isinstance(event, DeliveryFailed):
            # never dead-letter a dead letter in a loop: record it in the log only once
            log.error("%s: dead letter seq=%d could not be handled: %s", consumer, seq, reason)
        else:
            await self.publish(dead)
            log.error("%s: seq=%d dead-lettered: %s", consumer, seq, reason)
        await msg.term()


def _ack_info(msg: Msg) -> tuple[int, int]:
    """(stream sequence, delivery count) from the ack subject, without building nats-py's
    full metadata object (a measurable cost per message on the consume path).

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` or the
    12+-token form with domain and account hash first (ADR-15).
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[4])
    if len(tokens) >= 12:
        return int(tokens[7]), int(tokens[6])
    meta = msg.metadata
    return int(meta.sequence.stream), int(meta.num_delivered)


def _type_from_subject(subject: str) -> str | None:
    parts = subject.split(".", 3)  # lm.ev.<study token>.<type>
    return parts[3] if len(parts) == 4 else None


class _ConnectionLog:
    """Connection trouble is logged once connected; before that, the caller's single
    clear ``BusUnavailable`` line says it all."""

    def __init__(self) -> None:
        self.connected = False
        self.errors: list[Exception] = []  # why the first connect failed (all attempts)
        self.denied: set[str] = set()  # subjects the server refused (permissions)

    def callbacks(self) -> dict[str, Any]:
        return {"error_cb": self.error, "disconnected_cb": self.disconnected,
                "reconnected_cb": self.reconnected}

    async def error(self, exc: Exception) -> None:
        text = str(exc)
        if "permissions violation for publish to" in text.lower():
            self.denied.add(text.rsplit(" to ", 1)[-1].strip().strip('"'))
        if self.connected:
            log.warning("nats: %s", exc)
        elif len(self.errors) < 20:
            self.errors.append(exc)

    def advice(self) -> str:
        """What the server or the TLS handshake said, and which setting to check. Any
        attempt's refusal counts: a later attempt may only have timed out."""
        texts = [str(e) or type(e).__name__ for e in self.errors]
        for text in texts:
            if "authoriz" in text.lower() or "authentication" in text.lower():
                return (f" The server refused the credentials ({text}): check "
                        "LASTMILE_NATS_USER and LASTMILE_NATS_PASSWORD, LASTMILE_NATS_CREDS, or "
                        "the role's user in LASTMILE_NATS_CREDENTIALS_FILE (the embedded "
                        "server's is nats-credentials.json in the state dir).")
        for exc, text in zip(self.errors, texts, strict=True):
            if isinstance(exc, ssl.SSLError) or "certificate" in text.lower() \
                    or "tls" in text.lower():
                return (f" TLS failed ({text}): set LASTMILE_NATS_TLS_CA to the CA that "
                        "signed the server's certificate (and LASTMILE_NATS_TLS_CERT/KEY if "
                        "it asks for a client certificate).")
        return ""

    async def disconnected(self) -> None:
        if self.connected:
            log.warning("nats: disconnected; reconnecting")

    async def reconnected(self) -> None:
        log.info("nats: reconnected")
