"""Bytes + headers <-> typed events.

Payload: compact JSON (msgspec) that names its own ``type`` and
``schema_version``; fields at their default are omitted. One header,
``Nats-Msg-Id`` (the event id), so JetStream de-duplicates a re-publish. The
type is in the subject too, so a consumer filters without parsing bodies.
Decoding is one pass through a tagged union; only an old ``schema_version``
takes the slower upcasting path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import msgspec

from events.base import Event
from events.catalogue import ALL_EVENT_TYPES
from events.errors import CodecError
from events.subjects import subject_for
from events.upcasting import upcast

HDR_MSG_ID = "Nats-Msg-Id"


def _build_registry(types: tuple[type[Event], ...]) -> dict[str, type[Event]]:
    registry: dict[str, type[Event]] = {}
    for cls in types:
        name = cls.type_name()
        if name in registry:
            raise ValueError(f"event type {name!r} used by {registry[name]} and {cls}")
        registry[name] = cls
    return registry


REGISTRY: dict[str, type[Event]] = _build_registry(ALL_EVENT_TYPES)

_encoder = msgspec.json.Encoder()
_union_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(
    Union[ALL_EVENT_TYPES]  # type: ignore[valid-type]  # noqa: UP007
)


class _Head(msgspec.Struct):
    type: str
    schema_version: int = 1


_head_decoder = msgspec.json.Decoder(_Head)


def event_class(type_name: str) -> type[Event]:
    try:
        return REGISTRY[type_name]
    except KeyError:
        raise CodecError(f"unknown event type {type_name!r}") from None


def encode(event: Event) -> tuple[str, bytes, dict[str, str]]:
    """The subject, body and headers to publish ``event`` with."""
    name = event.type_name()
    return subject_for(name, event.study_uid), _encoder.encode(event), {HDR_MSG_ID: event.event_id}


def encode_body(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, headers: Mapping[str, str] | None = None) -> Event:
    """Decode one message. Raises ``CodecError`` with the reason on any problem.

    ``headers`` are accepted for symmetry with ``encode``; the body is self-describing.
    """
    try:
        event = _union_decoder.decode(data)
        if event.schema_version == type(event).SCHEMA_VERSION:
            return event
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass  # maybe an old version (fields renamed): look at its head, then upcast
    try:
        head = _head_decoder.decode(data)
        name, version = head.type, head.schema_version
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CodecError(f"not a Lastmile event: {exc}") from None
    cls = event_class(name)
    current = cls.SCHEMA_VERSION
    try:
        if version == current:
            return msgspec.json.decode(data, type=cls)  # raises the precise reason
        if version > current:
            raise CodecError(
                f"{name} v{version} was written by a newer Lastmile (this one reads up to "
                f"v{current}); upgrade this process"
            )
        raw: dict[str, Any] = msgspec.json.decode(data)
        raw = upcast(name, raw, current)
        return msgspec.convert(raw, cls)
    except (msgspec.DecodeError, msgspec.ValidationError, LookupError, KeyError) as exc:
        raise CodecError(f"invalid {name} v{version}: {exc}") from None


def to_builtins(event: Event) -> dict[str, Any]:
    """Plain JSON-able dict (for ``--json`` output, parquet export)."""
    out: dict[str, Any] = msgspec.to_builtins(event)
    return out
