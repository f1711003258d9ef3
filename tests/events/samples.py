"""Sample events of every catalogue type, built from the type hints (for codec tests)."""

from __future__ import annotations

import types
import typing
import zlib
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import msgspec

from events.base import Event
from events.catalogue import ALL_EVENT_TYPES

FIXED_TIME = datetime(2026, 11, 1, 8, 30, 0, tzinfo=UTC)


def sample_value(tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return sample_value(args[0], name)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return (sample_value(args[0], name),)
        return tuple(sample_value(a, name) for a in args)
    if origin is dict:
        k, v = typing.get_args(tp)
        return {sample_value(k, "key"): sample_value(v, name)}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return next(iter(tp))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return sample_struct(tp)
    if tp is bool:
        return True
    if tp is int:
        return 3
    if tp is float:
        return 1.25
    if tp is datetime:
        return FIXED_TIME
    if tp is str:
        return f"1.2.826.0.1.3680043.8.498.{len(name)}" if name.endswith("uid") else f"{name}-x"
    raise TypeError(f"no sample for {tp!r} ({name})")


def sample_struct(cls: type[msgspec.Struct]) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in msgspec.structs.fields(cls):
        if f.name == "type":
            continue
        values[f.name] = sample_value(hints[f.name], f.name)
    return cls(**values)


def sample_event(cls: type[Event]) -> Event:
    event = sample_struct(cls)
    return msgspec.structs.replace(
        event,
        event_id=f"00000000-0000-4000-8000-{zlib.crc32(cls.type_name().encode()):012d}",
        schema_version=cls.SCHEMA_VERSION,
        study_uid="1.2.826.0.1.3680043.8.498.1",
        pipeline="bts",
        causation_id=None,
    )


def all_samples() -> list[Event]:
    return [sample_event(cls) for cls in ALL_EVENT_TYPES]
