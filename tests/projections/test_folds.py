"""Folds are pure and produce rows that fit their tables; the store applies each log entry
exactly once, whatever the batching, redelivery or crash between insert and commit."""

from __future__ import annotations

import pytest

from events.catalogue import ALL_EVENT_TYPES, InstanceStored, ReviewSubmitted
from events.errors import CodecError
from projections.duckdb_store import ProjectionStore, arrow_table
from projections.errors import StoreError
from projections.folds import FOLDS, RowBatch, fold
from projections.schema import TABLE_BY_NAME
from tests.events.samples import all_samples, sample_event


def test_every_event_type_has_a_fold() -> None:
    assert set(FOLDS) == set(ALL_EVENT_TYPES)


@pytest.mark.parametrize("event", all_samples(), ids=lambda e: e.type_name())
def test_each_fold_fits_its_table_and_is_deterministic(event: object) -> None:
    changes = fold(7, event)  # type: ignore[arg-type]
    assert changes == fold(7, event)  # type: ignore[arg-type]
    for table, row in changes:
        spec = TABLE_BY_NAME[table]
        assert len(row) == len(spec.all_columns), table
        assert row[0] == 7
        data = arrow_table(table, [row])  # types convert
        assert data.num_rows == 1


def test_a_review_adds_one_read_per_label_with_the_verdict() -> None:
    review = sample_event(ReviewSubmitted)
    review = type(review)(**{**{f: getattr(review, f) for f in review.__struct_fields__},
                             "reads": {"left_hip": "fracture"},
                             "agree": {"left_hip": False, "right_hip": True}})
    rows = [r for t, r in fold(3, review) if t == "review_reads"]
    cols = [n for n, _ in TABLE_BY_NAME["review_reads"].all_columns]
    got = sorted((r[cols.index("label")], r[cols.index("read")], r[cols.index("agree")])
                 for r in rows)
    assert got == [("left_hip", "fracture", False), ("right_hip", None, True)]


def test_an_undecodable_message_becomes_a_row_not_a_gap() -> None:
    assert fold(9, CodecError("not a Lastmile event: junk")) == [
        ("undecodable", (9, "not a Lastmile event: junk"))]


def _batch(events: list, start: int) -> RowBatch:
    return RowBatch().extend(enumerate(events, start))


def test_a_redelivered_batch_is_applied_once(site_events: list) -> None:
    events = site_events[:400]
    store = ProjectionStore(":memory:")
    assert store.apply(_batch(events[:200], 1)) == 200
    once = store.checksums()
    assert store.apply(_batch(events[:200], 1)) == 0  # redelivery: nothing
    assert store.checksums() == once
    # a batch straddling the checkpoint applies only the new part
    assert store.apply(_batch(events[100:300], 101)) == 100
    assert store.checkpoint() == 300
    whole = ProjectionStore(":memory:")
    whole.apply(_batch(events[:300], 1))
    assert store.checksums() == whole.checksums()
    store.close()
    whole.close()


@pytest.mark.parametrize("size", [1, 37, 1000])
def test_batching_does_not_change_the_content(site_events: list, size: int) -> None:
    events = site_events[:1000]
    a = ProjectionStore(":memory:")
    for i in range(0, len(events), size):
        a.apply(_batch(events[i:i + size], i + 1))
    b = ProjectionStore(":memory:")
    b.apply(_batch(events, 1))
    assert a.checksums() == b.checksums()
    assert a.counts()["instances"] > 0
    a.close()
    b.close()


class _Crashing(ProjectionStore):
    def _before_commit(self, con: object) -> None:
        raise RuntimeError("power cut")


def test_a_failure_between_insert_and_commit_applies_nothing(site_events: list, tmp_path
                                                             ) -> None:
    path = tmp_path / "rm.duckdb"
    store = ProjectionStore(path)
    store.apply(_batch(site_events[:100], 1))
    before = store.checksums()
    store.close()
    crashing = _Crashing(path)
    with pytest.raises(RuntimeError, match="power cut"):
        crashing.apply(_batch(site_events[100:200], 101))
    crashing.close()
    again = ProjectionStore(path)
    assert again.checkpoint() == 100
    assert again.checksums() == before
    again.apply(_batch(site_events[100:200], 101))
    assert again.checkpoint() == 200
    again.close()


def test_a_database_error_is_reported_and_the_batch_is_not_applied(site_events: list) -> None:
    store = ProjectionStore(":memory:")
    bad = RowBatch()
    bad.add(1, site_events[0])
    table = next(iter(bad.rows))
    bad.rows[table] = [("not a sequence", *bad.rows[table][0][1:])]
    with pytest.raises((StoreError, Exception)):
        store.apply(bad)
    assert store.checkpoint() == 0
    assert sum(store.counts().values()) == 0
    store.close()


def test_instance_rows_keep_the_drift_inputs() -> None:
    ev = sample_event(InstanceStored)
    (table, row), = fold(1, ev)
    cols = [n for n, _ in TABLE_BY_NAME[table].all_columns]
    assert row[cols.index("manufacturer")] == ev.manufacturer
    assert row[cols.index("pixel_spacing_mm")] == ev.pixel_spacing_mm
    assert row[cols.index("calling_ae")] == ev.calling_ae
