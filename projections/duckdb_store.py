"""The DuckDB edge: tables, the batch writer with its checkpoint, rebuild, checksums.

Exactly-once over at-least-once delivery: a batch's rows and the last stream
sequence it covers are committed in ONE transaction (table ``checkpoint``). After a
crash, the uncommitted batch is gone with its checkpoint, so the projector resumes
at ``checkpoint + 1`` and nothing is skipped; an entry at or below the checkpoint
(a redelivery) is dropped before insert, so nothing is applied twice.

Rows go in per table as one Arrow table per batch (``INSERT ... SELECT`` from a
registered Arrow table), never row by row: ``executemany`` runs at ~1k rows/s here,
Arrow at millions.

DuckDB lets one process write a file (or several read it). ``keep_open=False``
opens the file per batch and closes it right after the commit, so ``lastmile
metrics`` and the dashboards can read between batches; see ``read_only``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from projections.errors import StoreBusy, StoreError
from projections.folds import Row, RowBatch
from projections.schema import CHECKPOINT_DDL, TABLE_BY_NAME, TABLES, VIEWS

MEMORY = ":memory:"


def _is_lock_error(exc: duckdb.Error) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text


def connect(path: Path | str, *, read_only: bool = False, wait_s: float = 10.0,
            ) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting up to ``wait_s`` while another process holds the lock."""
    target = str(path)
    if target != MEMORY and not read_only:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(target, read_only=read_only)
        except duckdb.IOException as exc:
            if not _is_lock_error(exc) or time.monotonic() + delay > deadline:
                if _is_lock_error(exc):
                    raise StoreBusy(
                        f"{target} is locked by another process for more than {wait_s:.0f}s "
                        "(a projector or a reader holding it open); try again, or stop it"
                    ) from None
                raise StoreError(f"cannot open {target}: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextlib.contextmanager
def read_only(path: Path | str, wait_s: float = 10.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read connection (metrics, dashboards): open, query, close, so the
    projector can take the write lock again."""
    if not Path(str(path)).exists():
        raise StoreError(f"no read model at {path}: run `lastmile up` or "
                         "`lastmile projections rebuild` first")
    con = connect(path, read_only=True, wait_s=wait_s)
    try:
        yield con
    finally:
        con.close()


def create_schema(con: duckdb.DuckDBPyConnection, projection: str) -> None:
    for table in TABLES:
        con.execute(table.ddl())
    con.execute(CHECKPOINT_DDL)
    con.execute("INSERT INTO checkpoint VALUES (?, 0, 0) ON CONFLICT DO NOTHING", [projection])
    for name, sql in VIEWS:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")


def drop_schema(con: duckdb.DuckDBPyConnection) -> None:
    for name, _ in VIEWS:
        con.execute(f"DROP VIEW IF EXISTS {name}")
    for table in TABLES:
        con.execute(f"DROP TABLE IF EXISTS {table.name}")
    con.execute("DROP TABLE IF EXISTS checkpoint")


def arrow_table(table_name: str, rows: list[Row]) -> pa.Table:
    """Rows (tuples in schema order) -> an Arrow table of the table's schema."""
    table = TABLE_BY_NAME[table_name]
    columns = list(zip(*rows, strict=True))
    arrays = [pa.array(col, type=typ) for col, (_, typ) in
              zip(columns, table.all_columns, strict=True)]
    return pa.Table.from_arrays(arrays, schema=table.arrow_schema)


class ProjectionStore:
    """The read model in one DuckDB file (or in memory), with its checkpoint."""

    def __init__(self, path: Path | str, *, projection: str = "main",
                 keep_open: bool = True, lock_wait_s: float = 30.0,
                 checkpoint_mb: int = 256) -> None:
        self.path = path
        self.checkpoint_mb = checkpoint_mb
        self.projection = projection
        self.keep_open = keep_open
        self.lock_wait_s = lock_wait_s
        self._con: duckdb.DuckDBPyConnection | None = None
        self._checkpoint: int | None = None
        with self._connection() as con:
            create_schema(con, projection)
            self._checkpoint = self._read_checkpoint(con)

    # ------------------------------------------------------------------ connections

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._con is not None:
            yield self._con
            return
        con = connect(self.path, wait_s=self.lock_wait_s)
        # DuckDB checkpoints (compresses the WAL into the file) every 16 MB of WAL by
        # default; at that rate checkpoints cost more than the inserts. 256 MB halves the
        # write time of a 1M-event fold; a reader opening the file replays at most that.
        con.execute(f"SET checkpoint_threshold = '{int(self.checkpoint_mb)}MB'")
        if self.keep_open or str(self.path) == MEMORY:
            self._con = con
            yield con
            return
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The store's connection for queries (metrics over a live store in this process)."""
        with self._connection() as con:
            yield con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> ProjectionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ checkpoint

    def _read_checkpoint(self, con: duckdb.DuckDBPyConnection) -> int:
        row = con.execute("SELECT last_sequence FROM checkpoint WHERE projection = ?",
                          [self.projection]).fetchone()
        return int(row[0]) if row else 0

    def checkpoint(self, *, fresh: bool = False) -> int:
        """The last stream sequence whose rows are committed (``fresh``: read it from the
        database, for a store another process or service writes)."""
        if self._checkpoint is None or fresh:
            with self._connection() as con:
                self._checkpoint = self._read_checkpoint(con)
        return self._checkpoint

    # ------------------------------------------------------------------ writing

    def apply(self, batch: RowBatch) -> int:
        """Commit a batch's rows and its last sequence together; return entries applied.

        Entries at or below the checkpoint were applied before (a redelivery, or a
        re-read after a crash between commit and acknowledgement) and are dropped.
        """
        if batch.last is None:
            return 0
        with self._connection() as con:
            done = self._read_checkpoint(con)  # the database is the truth, not our cache
            if batch.last <= done:
                self._checkpoint = done
                return 0
            rows = batch.rows
            events = batch.events
            if batch.first is not None and batch.first <= done:
                rows = {t: [r for r in rs if r[0] > done] for t, rs in rows.items()}
                events = sum(1 for s in batch.seqs if s > done)
            con.begin()
            try:
                for table_name, table_rows in rows.items():
                    if not table_rows:
                        continue
                    con.from_arrow(arrow_table(table_name, table_rows)).insert_into(table_name)
                self._before_commit(con)
                con.execute(
                    "UPDATE checkpoint SET last_sequence = ?, events = events + ? "
                    "WHERE projection = ?",
                    [batch.last, events, self.projection],
                )
                con.commit()
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):
                    con.rollback()
                raise StoreError(
                    f"batch {batch.first}..{batch.last} not applied ({exc}); the projector "
                    "will retry from the checkpoint"
                ) from None
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.rollback()
                raise
        self._checkpoint = batch.last
        return events

    def _before_commit(self, con: duckdb.DuckDBPyConnection) -> None:
        """Called after a batch's rows are inserted, before the commit (a seam for crash
        drills in tests: a process killed here must lose the whole batch)."""

    def reset(self) -> None:
        """Drop every table and view and start again at sequence 0 (rebuild)."""
        with self._connection() as con:
            con.begin()
            drop_schema(con)
            create_schema(con, self.projection)
            con.commit()
        self._checkpoint = 0

    # ------------------------------------------------------------------ inspection

    def checksums(self) -> dict[str, tuple[int, int]]:
        return checksums_of(self)

    def counts(self) -> dict[str, int]:
        return {name: n for name, (n, _) in self.checksums().items()}


def table_checksums(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    """Per table: (row count, order-independent content hash). Equal checksums mean the
    same multiset of rows, whatever order they were inserted in."""
    out: dict[str, tuple[int, int]] = {}
    for table in TABLES:
        n, h = con.execute(
            f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0) FROM {table.name} t"
        ).fetchone() or (0, 0)
        out[table.name] = (int(n), int(h))
    return out


def checksums_of(store: ProjectionStore) -> dict[str, tuple[int, int]]:
    with store.connection() as con:
        return table_checksums(con)
