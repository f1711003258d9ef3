"""The event envelope: what every fact in the log carries, whatever its type.

Events are frozen ``msgspec`` structs. One base class carries the envelope
(identity, time, causality, actor, study and pipeline); each event type
subclasses it with a stable dotted ``type`` tag and its own typed payload
fields. The type tag, never the Python class path, is the stored identity, so
classes can be renamed or moved without breaking old data.
"""

from __future__ import annotations

import builtins
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Self, TypeVar

import msgspec

# Namespace for deterministic event ids (uuid5). Fixed forever: changing it would
# make a retried fact look new.
E = TypeVar("E", bound="Event")

LASTMILE_NAMESPACE = uuid.UUID("6f1f3c3e-7a51-4f0e-9c1a-2b8f5d0c4e11")


def utcnow() -> datetime:
    return datetime.now(UTC)


def deterministic_id(*parts: object) -> str:
    """An event id derived from what makes the fact unique.

    Used where a retry of the same work must not create a second fact (for
    example an instance stored: the SOP Instance UID and the content hash).
    JetStream then drops the re-publish inside its duplicate window.
    """
    key = "\x1f".join(str(p) for p in parts)
    return str(uuid.uuid5(LASTMILE_NAMESPACE, key))


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    """Envelope fields shared by every event.

    ``type`` is the tag (set per subclass); ``schema_version`` the payload version
    this class writes (older versions are upcast on read, see ``events.upcasting``).
    """

    SCHEMA_VERSION: ClassVar[int] = 1

    event_id: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    correlation_id: str
    causation_id: str | None = None
    actor: str
    study_uid: str | None = None
    pipeline: str | None = None

    @classmethod
    def new(
        cls,
        *,
        actor: str,
        study_uid: str | None = None,
        pipeline: str | None = None,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        **payload: Any,
    ) -> Self:
        """Build an event, filling the envelope.

        ``correlation_id`` defaults to one id per study (derived from the Study
        Instance UID), so every fact about a study shares it.
        """
        now = utcnow()
        if correlation_id is None:
            correlation_id = (
                deterministic_id("study", study_uid) if study_uid else str(uuid.uuid4())
            )
        return cls(
            event_id=event_id or str(uuid.uuid4()),
            schema_version=cls.SCHEMA_VERSION,
            occurred_at=occurred_at or now,
            recorded_at=now,
            correlation_id=correlation_id,
            causation_id=causation_id,
            actor=actor,
            study_uid=study_uid,
            pipeline=pipeline,
            **payload,
        )

    @classmethod
    def type_name(cls) -> str:
        """The stable dotted type name (the msgspec tag)."""
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str):
            raise TypeError(f"{cls.__name__} has no type tag")
        return tag

    @property
    def type(self) -> str:
        return self.type_name()

    def caused(self, cls: builtins.type[E], *, actor: str, **payload: Any) -> E:
        """A follow-up event of ``cls`` caused by this one (same study, correlation)."""
        payload.setdefault("pipeline", self.pipeline)
        payload.setdefault("study_uid", self.study_uid)
        return cls.new(
            actor=actor,
            correlation_id=self.correlation_id,
            causation_id=self.event_id,
            **payload,
        )

