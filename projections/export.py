"""Derived labels for retraining and audit: reviews and edits per study, as Parquet.

``lastmile replay --to parquet DIR`` writes the events (``events.export``) and, with
this module, ``DIR/labels/reviews.parquet`` (one row per reader's read of one finding
label) and ``DIR/labels/edits.parquet`` (one row per corrected mask, with the volumes
recomputed from it and its Dice against the AI mask). Both carry the study UID, so a
retraining set is assembled per study.

With a ``Deidentifier`` (``--deidentify``) every value goes through the same mapping as
the event export (``events.deidentify``): UIDs, run keys, event ids, readers, blinded
labels and times remapped alike, so the labels still join the de-identified events; the
store key and SHA-256 of an edited mask (they name the site's file) are left out.
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
from events.deidentify import Deidentifier

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
                  deid: Deidentifier | None = None) -> LabelExport:
    """Write ``labels/reviews.parquet`` and ``labels/edits.parquet`` under ``directory``."""
    p = deid.pseudo if deid else None

    def uid(v: str | None) -> str | None:
        return None if v is None else (p.uid(v) if p else v)

    def ident(v: str | None, kind: str = "id") -> str | None:
        return None if v is None else (p.ident(v, kind) if p else v)

    def person(v: str) -> str:
        return p.person(v) if p else v

    def seq_of(seq: int) -> int:
        return deid.sequence(seq) if deid else seq

    def when(ev: Event) -> object:
        return deid.timestamp(ev.occurred_at, ev.study_uid) if deid else ev.occurred_at

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
                    "sequence": seq_of(seq), "event_id": ident(ev.event_id, "event"),
                    "occurred_at": when(ev), "study_uid": uid(ev.study_uid),
                    "pipeline": ev.pipeline, "run_key": ident(ev.run_key),
                    "reader": person(ev.reader), "label": label, "read": ev.reads.get(label),
                    "agree": ev.agree.get(label), "ai_classification": cls,
                    "ai_probability": prob, "confidence": ev.confidence,
                    "seconds_on_case": ev.seconds_on_case,
                    "blinded_label": ident(ev.blinded_label), "source": ev.source,
                })
        elif isinstance(ev, EditSubmitted):
            edits[ev.event_id] = {
                "sequence": seq_of(seq), "event_id": ident(ev.event_id, "event"),
                "occurred_at": when(ev), "study_uid": uid(ev.study_uid),
                "pipeline": ev.pipeline, "run_key": ident(ev.run_key),
                "reader": person(ev.reader), "store_key": None if deid else ev.store_key,
                "sha256": None if deid else ev.sha256,
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
