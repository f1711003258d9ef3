"""Replay and export: the log as JSON lines or Parquet, optionally with UIDs remapped.

``--deidentify`` replaces every DICOM UID (study, series, SOP instance, and the
correlation ids derived from them) with a ``2.25.<n>`` UID computed by HMAC under
a key, so the same UID maps to the same new UID across the whole export, and
across exports made with the same key, but cannot be mapped back without it.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from events.base import Event
from events.codec import to_builtins

ENVELOPE_COLUMNS = (
    "sequence",
    "event_id",
    "type",
    "schema_version",
    "occurred_at",
    "recorded_at",
    "correlation_id",
    "causation_id",
    "actor",
    "study_uid",
    "pipeline",
)

_UID_KEYS = ("_uid", "_uids")
_ID_KEYS = ("correlation_id", "run_key")  # run keys embed the study UID


class UidRemapper:
    """Consistent one-way remapping of DICOM UIDs (PS3.5 B.2: UUID-derived 2.25 UIDs)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def uid(self, value: str) -> str:
        digest = hmac.new(self._key, b"uid\x1f" + value.encode(), hashlib.sha256).digest()
        return "2.25." + str(uuid.UUID(bytes=digest[:16]).int)

    def ident(self, value: str) -> str:
        digest = hmac.new(self._key, b"id\x1f" + value.encode(), hashlib.sha256).digest()
        return str(uuid.UUID(bytes=digest[:16]))

    def remap(self, obj: Any, key: str = "") -> Any:
        if isinstance(obj, dict):
            return {k: self.remap(v, k) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.remap(v, key) for v in obj]
        if isinstance(obj, str) and obj:
            if key.endswith(_UID_KEYS):
                return self.uid(obj)
            if key in _ID_KEYS:
                return self.ident(obj)
        return obj


def event_row(sequence: int, event: Event, remapper: UidRemapper | None = None) -> dict[str, Any]:
    """A flat row: envelope columns, plus the whole event as JSON in ``body``."""
    data = to_builtins(event)
    if remapper is not None:
        data = remapper.remap(data)
    row = {k: data.get(k) for k in ENVELOPE_COLUMNS if k != "sequence"}
    row["sequence"] = sequence
    row["body"] = msgspec.json.encode(data).decode()
    return row


SCHEMA = pa.schema(
    [
        ("sequence", pa.int64()),
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("schema_version", pa.int32()),
        ("occurred_at", pa.string()),
        ("recorded_at", pa.string()),
        ("correlation_id", pa.string()),
        ("causation_id", pa.string()),
        ("actor", pa.string()),
        ("study_uid", pa.string()),
        ("pipeline", pa.string()),
        ("body", pa.string()),
    ]
)


class ParquetExporter:
    """Writes ``events.parquet`` in row groups, so a long log never sits in memory."""

    def __init__(self, directory: Path, *, remapper: UidRemapper | None = None,
                 row_group: int = 50_000) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.parquet"
        self._writer = pq.ParquetWriter(self.path, SCHEMA, compression="zstd")
        self._rows: list[dict[str, Any]] = []
        self._remapper = remapper
        self._row_group = row_group
        self.count = 0

    def add(self, sequence: int, event: Event) -> None:
        self._rows.append(event_row(sequence, event, self._remapper))
        self.count += 1
        if len(self._rows) >= self._row_group:
            self._flush()

    def add_all(self, items: Iterable[tuple[int, Event]]) -> None:
        for seq, ev in items:
            self.add(seq, ev)

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA))
            self._rows.clear()

    def close(self) -> None:
        self._flush()
        self._writer.close()
