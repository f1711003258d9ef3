"""Derived labels per study, as Parquet, with consistent UID remapping when de-identified."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from events.base import Event
from events.catalogue import EditSubmitted, ReviewSubmitted
from events.deidentify import Deidentifier, LogContext, Pseudonymiser
from events.export import ParquetExporter
from projections.export import export_labels


def _numbered(events: list[Event]) -> list[tuple[int, Event]]:
    return list(enumerate(events, 1))


def test_labels_hold_every_read_and_edit_per_study(site_events: list[Event],
                                                   tmp_path: Path) -> None:
    result = export_labels(_numbered(site_events), tmp_path)
    reviews = pq.read_table(result.reviews_path).to_pylist()
    edits = pq.read_table(result.edits_path).to_pylist()
    expected_reads = sum(len(set(e.reads) | set(e.agree)) for e in site_events
                         if isinstance(e, ReviewSubmitted))
    assert len(reviews) == result.reviews == expected_reads
    assert len(edits) == sum(isinstance(e, EditSubmitted) for e in site_events)
    hip = next(r for r in reviews if r["label"] == "left_hip")
    assert hip["ai_classification"] in {"normal", "fracture", "hardware"}
    assert all(e["dice"] and e["measurements"] for e in edits)  # recomputed after each edit


def test_deidentified_labels_join_the_deidentified_events(site_events: list[Event],
                                                          tmp_path: Path) -> None:
    numbered = _numbered(site_events)
    deid = Deidentifier(Pseudonymiser(b"k" * 32), LogContext.of(numbered))
    export_labels(numbered, tmp_path, deid)
    exporter = ParquetExporter(tmp_path, deid=deid)
    exporter.add_all(numbered)
    exporter.close()
    reviews = pq.read_table(tmp_path / "labels" / "reviews.parquet").to_pylist()
    edits = pq.read_table(tmp_path / "labels" / "edits.parquet").to_pylist()
    events = pq.read_table(tmp_path / "events.parquet").to_pylist()
    originals = {e.study_uid for e in site_events if e.study_uid}
    original_ids = {e.event_id for e in site_events}
    by_id = {e["event_id"]: e for e in events}
    assert not original_ids & set(by_id)  # event ids do not match the site's log
    readers = {e.reader for e in site_events if isinstance(e, ReviewSubmitted | EditSubmitted)}
    for r in reviews + edits:
        assert r["study_uid"] not in originals
        ev = by_id[r["event_id"]]  # the same remapping: the labels join the events
        assert r["study_uid"] == ev["study_uid"] and r["sequence"] == ev["sequence"]
        assert r["occurred_at"] == ev["occurred_at"]  # the same shifted time
        assert r["reader"] not in readers and r["reader"].startswith("U-")
        assert not any(uid in r["run_key"] for uid in originals)
    assert all(e["store_key"] is None and e["sha256"] is None for e in edits)
    text = (tmp_path / "labels" / "reviews.parquet").read_bytes()
    assert not any(uid.encode() in text for uid in list(originals)[:50])
