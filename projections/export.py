"""Derived labels for retraining and audit: reviews and edits per study, as Parquet.

``lastmile replay --to parquet DIR`` writes the events (``events.export``) and, with
this module, ``DIR/labels/reviews.parquet`` (one row per reader's read of one finding
label) and ``DIR/labels/edits.parquet`` (one row per corrected mask, with the volumes
recomputed from it and its Dice against the AI mask). Both carry the study UID, so a
retraining set is assembled per study.

With a ``UidRemapper`` (``--deidentify``) every UID is remapped with the same key as
the event export, so the labels still join the remapped events; run keys go through
``ident`` (they embed the study UID); event ids stay as in the
event export so labels join it; the store key of an edited mask (a path
that may embed UIDs) is left out and only its SHA-256 kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from events.base import Event
from events.catalogue import (
    EditSubmitted,
    InferenceCompleted,
    MeasurementRecomputed,
    ReviewSubmitted,
)
from events.export import UidRemapper

REVIEWS_SCHEMA = pa.schema([
    ("sequence", pa.int64()),
    ("event_id", pa.string()),
    ("occurred_at", pa.timestamp("us", tz="UTC")),
    ("study_uid", pa.string()),
    ("pipeline", pa.string()),
    ("run_key", pa.string()),
    ("reader", pa.string()),
    ("label", pa.string()),
    ("read", pa.string()),
    ("agree", pa.bool_()),
    ("ai_classification", pa.string()),
    ("ai_probability", pa.float64()),
    ("confidence", pa.int32()),
    ("seconds_on_case", pa.float64()),
    ("blinded_label", pa.string()),
    ("source", pa.string()),
])

EDITS_SCHEMA = pa.schema([
    ("sequence", pa.int64()),
    ("event_id", pa.string()),
    ("occurred_at", pa.timestamp("us", tz="UTC")),
    ("study_uid", pa.string()),
    ("pipeline", pa.string()),
    ("run_key", pa.string()),
    ("reader", pa.string()),
    ("store_key", pa.string()),
    ("sha256", pa.string()),
    ("measurements", pa.map_(pa.string(), pa.float64())),
    ("dice", pa.map_(pa.string(), pa.float64())),
])


@dataclass(frozen=True)
class LabelExport:
    reviews_path: Path
    edits_path: Path
    reviews: int
    edits: int


def export_labels(events: Iterable[tuple[int, Event]], directory: Path,
                  remapper: UidRemapper | None = None) -> LabelExport:
    """Write ``labels/reviews.parquet`` and ``labels/edits.parquet`` under ``directory``."""
    uid = remapper.uid if remapper else (lambda v: v)
    ident = remapper.ident if remapper else (lambda v: v)

    def opt(f: object, v: str | None) -> str | None:
        return None if v is None else f(v)  # type: ignore[operator]

    ai: dict[tuple[str, str], tuple[str, float | None]] = {}
    reviews: list[dict[str, object]] = []
    edits: dict[str, dict[str, object]] = {}
    for seq, ev in events:
        if isinstance(ev, InferenceCompleted):
            for f in ev.findings:
                ai[(ev.run_key, f.label)] = (f.classification, f.probability)
        elif isinstance(ev, ReviewSubmitted):
            for label in sorted(set(ev.reads) | set(ev.agree)):
                cls, prob = ai.get((ev.run_key, label), (None, None))
                reviews.append({
                    "sequence": seq, "event_id": ev.event_id,
                    "occurred_at": ev.occurred_at, "study_uid": opt(uid, ev.study_uid),
                    "pipeline": ev.pipeline, "run_key": ident(ev.run_key),
                    "reader": ev.reader, "label": label, "read": ev.reads.get(label),
                    "agree": ev.agree.get(label), "ai_classification": cls,
                    "ai_probability": prob, "confidence": ev.confidence,
                    "seconds_on_case": ev.seconds_on_case,
                    "blinded_label": ev.blinded_label, "source": ev.source,
                })
        elif isinstance(ev, EditSubmitted):
            edits[ev.event_id] = {
                "sequence": seq, "event_id": ev.event_id, "occurred_at": ev.occurred_at,
                "study_uid": opt(uid, ev.study_uid), "pipeline": ev.pipeline,
                "run_key": ident(ev.run_key), "reader": ev.reader,
                "store_key": None if remapper else ev.store_key, "sha256": ev.sha256,
                "measurements": [], "dice": [],
            }
        elif isinstance(ev, MeasurementRecomputed) and ev.edit_event_id in edits:
            row = edits[ev.edit_event_id]
            row["measurements"] = [(m.name, m.value) for m in ev.measurements]
            row["dice"] = sorted(ev.dice.items())
    out = directory / "labels"
    out.mkdir(parents=True, exist_ok=True)
    reviews_path, edits_path = out / "reviews.parquet", out / "edits.parquet"
    pq.write_table(pa.Table.from_pylist(reviews, schema=REVIEWS_SCHEMA), reviews_path,
                   compression="zstd")
    pq.write_table(pa.Table.from_pylist(list(edits.values()), schema=EDITS_SCHEMA),
                   edits_path, compression="zstd")
    return LabelExport(reviews_path, edits_path, len(reviews), len(edits))
