"""Bytes + headers <-> typed events.

Payload: compact JSON (msgspec). Headers: ``Nats-Msg-Id`` (the event id, so
JetStream de-duplicates a re-publish), ``Lm-Type`` and ``Lm-Schema``, so a
consumer can route or upcast without parsing the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from events.base import Event
from events.catalogue import ALL_EVENT_TYPES
from events.errors import CodecError
from events.subjects import subject_for
from events.upcasting import upcast

HDR_MSG_ID = "Nats-Msg-Id"
HDR_TYPE = "Lm-Type"
HDR_SCHEMA = "Lm-Schema"


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
_decoders = {cls: msgspec.json.Decoder(cls) for cls in ALL_EVENT_TYPES}


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
    headers = {
        HDR_MSG_ID: event.event_id,
        HDR_TYPE: name,
        HDR_SCHEMA: str(event.schema_version),
    }
    return subject_for(name, event.study_uid), _encoder.encode(event), headers


def encode_body(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, headers: Mapping[str, str] | None = None) -> Event:
    """Decode one message. Raises ``CodecError`` with the reason on any problem."""
    try:
        if headers and HDR_TYPE in headers:
            name = headers[HDR_TYPE]
            version = int(headers.get(HDR_SCHEMA, "1"))
        else:
            head = _head_decoder.decode(data)
            name, version = head.type, head.schema_version
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise CodecError(f"not a Lastmile event: {exc}") from None
    cls = event_class(name)
    current = cls.SCHEMA_VERSION
    try:
        if version == current:
            return _decoders[cls].decode(data)
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
