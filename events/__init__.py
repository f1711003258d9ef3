"""The event log: catalogue, codec, subjects and the JetStream adapter.

Imports nothing from the other Lastmile packages.
"""

from events.base import Event, deterministic_id, utcnow
from events.catalogue import *  # noqa: F403
from events.catalogue import ALL_EVENT_TYPES
from events.codec import REGISTRY, decode, encode
from events.errors import BusUnavailable, CodecError, EventsError, PublishError

__all__ = [
    "ALL_EVENT_TYPES",
    "REGISTRY",
    "BusUnavailable",
    "CodecError",
    "Event",
    "EventsError",
    "PublishError",
    "decode",
    "deterministic_id",
    "encode",
    "utcnow",
]
