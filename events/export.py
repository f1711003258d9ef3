"""Replay and export: the log as JSON lines or Parquet, optionally de-identified.

``--deidentify`` passes every event through one ``events.deidentify.Deidentifier``
(UIDs, ids, people and dates remapped with a key derived from the site secret; the
site's files, places and network removed; free text cleaned), the same one the label
tables and a retraining set use, so every file of an export joins every other.

Timestamps are Parquet timestamps (UTC, microseconds) in every table.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from events.base import Event
from events.codec import to_builtins
from events.deidentify import Deidentifier

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
_TIMESTAMPS = ("occurred_at", "recorded_at")


def event_row(sequence: int, event: Event, deid: Deidentifier | None = None) -> dict[str, Any]:
    """A flat row: envelope columns (timestamps as ``datetime``), plus the whole event as
    JSON in ``body``; de-identified when ``deid`` is given (the sequence then being the
    event's position in the export)."""
    if deid is not None:
        data = deid.event(event)
        sequence = deid.sequence(sequence)
    else:
        data = to_builtins(event)
    row = {k: data.get(k) for k in ENVELOPE_COLUMNS if k != "sequence"}
    for k in _TIMESTAMPS:
        value = row[k]
        if isinstance(value, str):
            row[k] = datetime.fromisoformat(value)
    row["sequence"] = sequence
    row["body"] = msgspec.json.encode(data).decode()
    return row


def json_line(sequence: int, event: Event, deid: Deidentifier | None = None) -> str:
    """One line of ``lastmile replay`` (JSON, the sequence first)."""
    data = deid.event(event) if deid is not None else to_builtins(event)
    seq = deid.sequence(sequence) if deid is not None else sequence
    return msgspec.json.encode({"sequence": seq, **data}).decode()


TIMESTAMP = pa.timestamp("us", tz="UTC")

SCHEMA = pa.schema(
    [
        ("sequence", pa.int64()),
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("schema_version", pa.int32()),
        ("occurred_at", TIMESTAMP),
        ("recorded_at", TIMESTAMP),
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

    def __init__(self, directory: Path, *, deid: Deidentifier | None = None,
                 row_group: int = 50_000) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.parquet"
        self._writer = pq.ParquetWriter(self.path, SCHEMA, compression="zstd")
        self._rows: list[dict[str, Any]] = []
        self._deid = deid
        self._row_group = row_group
        self.count = 0

    def add(self, sequence: int, event: Event) -> None:
        self._rows.append(event_row(sequence, event, self._deid))
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
