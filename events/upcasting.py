"""Upcasters: small pure functions that lift an old payload to the next version.

Registered per (type name, from_version). ``upcast`` applies them in sequence
until the payload reaches the class's current ``SCHEMA_VERSION``. Golden fixtures
of every version live in ``tests/fixtures/events``; a test reads each old one
back through the current class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Raw = dict[str, Any]
Upcaster = Callable[[Raw], Raw]

UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    def register(fn: Upcaster) -> Upcaster:
        key = (type_name, from_version)
        if key in UPCASTERS:
            raise ValueError(f"two upcasters for {type_name} v{from_version}")
        UPCASTERS[key] = fn
        return fn

    return register


def upcast(type_name: str, raw: Raw, target_version: int) -> Raw:
    version = int(raw.get("schema_version", 1))
    while version < target_version:
        fn = UPCASTERS.get((type_name, version))
        if fn is None:
            raise LookupError(f"no upcaster for {type_name} v{version} -> v{version + 1}")
        raw = fn(dict(raw))
        version += 1
        raw["schema_version"] = version
    return raw


@upcaster("ingest.instance.stored", 1)
def _instance_stored_v1_v2(raw: Raw) -> Raw:
    """v1 wrote ``size`` and an absolute ``path`` ending in the content address."""
    raw["size_bytes"] = raw.pop("size")
    path = str(raw.pop("path"))
    # content-addressed layout: .../ab/cd/<sha256>.dcm -> "ab/cd/<sha256>.dcm"
    raw["store_key"] = "/".join(path.replace("\\", "/").split("/")[-3:])
    return raw


_V1_COMPLETION_REASONS = {
    "quiet": "quiet_period",
    "manifest": "expected_series",
    "released": "association_released",
    "manual": "forced",
    "timeout": "max_wait",
}


@upcaster("ingest.study.completed", 1)
def _study_completed_v1_v2(raw: Raw) -> Raw:
    """v1 had free-text reasons and no latency (unknown, recorded as -1)."""
    raw["reason"] = _V1_COMPLETION_REASONS.get(raw["reason"], raw["reason"])
    raw.setdefault("latency_s", -1.0)
    return raw
