"""A received dataset held on disk instead of in memory (issue 18 item 7).

With ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming
C-STORE data set, fragment by fragment, to a temporary file in the DICOM File Format
(its own File Meta, then the data set as received) and hands the handler its path; it
removes the file after the handler returns. ``SpooledDataset`` is that data set without
the File Meta: its size, a zero-copy view for the header walk and decode (only the
pages holding element headers are read; pixel data is skipped), and its bytes in
fixed-size pieces for the hash and the copy into the store. So a receiver holds
O(piece) of an instance in memory, whatever its size, instead of about twice the size.
``spool_into`` points pynetdicom's temporary files at the store's temporary folder.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ingest.dataset import inflate_pieces

PIECE = 1 << 20


_SPOOL_DIRS: list[Path] = []  # the stores of running receivers, newest last


def _spool_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's ``NamedTemporaryFile`` for incoming data sets, in the store's own
    temporary folder (same disk as the store, watched by the free-space check, named
    ``in-*.part`` so a crash's leftovers are removed at start) instead of the system's
    (often a small tmpfs, i.e. memory)."""
    if _SPOOL_DIRS and _SPOOL_DIRS[-1].is_dir():
        kwargs.update(dir=_SPOOL_DIRS[-1], prefix="in-", suffix=".part")
    return tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom closes it


def spool_into(directory: Path) -> None:
    """Make pynetdicom write received data sets into ``directory`` (``release`` undoes)."""
    import pynetdicom.dimse_messages as messages

    messages.NamedTemporaryFile = _spool_file  # type: ignore[assignment]
    _SPOOL_DIRS.append(directory)


def release(directory: Path) -> None:
    if directory in _SPOOL_DIRS:
        _SPOOL_DIRS.remove(directory)


def meta_end(head: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the 128-byte preamble, ``DICM``
    and the File Meta group whose length (0002,0000) is its first element (PS3.10 7.1)."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file with a File Meta group length")
    (group_length,) = struct.unpack_from("<I", head, 140)
    return 144 + group_length


@dataclass
class SpooledDataset:
    """The data set part of a file pynetdicom received to disk."""

    path: Path
    offset: int
    size: int
    owned: bool = False  # a file of ours (an inflation): removed by ``close``
    _file: BinaryIO | None = field(default=None, init=False, repr=False)
    _map: mmap.mmap | None = field(default=None, init=False, repr=False)
    _view: memoryview | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, path: Path) -> SpooledDataset:
        with open(path, "rb") as f:
            head = f.read(4096)
            total = f.seek(0, 2)
        start = meta_end(head)
        return cls(path, start, total - start)

    def __len__(self) -> int:
        return self.size

    def view(self) -> memoryview:
        """A read-only view of the data set (memory-mapped: pages are read on touch)."""
        if self._view is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
            if self.size == 0:
                self._view = memoryview(b"")
            else:
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                self._view = memoryview(self._map)[self.offset:]
        return self._view

    def pieces(self, size: int = PIECE) -> Iterator[bytes]:
        """The data set's bytes in pieces (plain reads, so the pages are not mapped)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while True:
                piece = f.read(size)
                if not piece:
                    return
                yield piece

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.owned = False


def inflate_to_disk(pieces: Iterable[bytes | memoryview], limit: int,
                    directory: Path) -> SpooledDataset:
    """Inflate a deflated data set into a file of ours in ``directory`` (the store's
    temporary folder, cleaned at start), never more than ``limit`` bytes: the header
    walk and decode then read it through a memory map like any received data set, so a
    deflate bomb costs disk up to the limit, not memory. Raises ``BadInstance``."""
    fd, name = tempfile.mkstemp(dir=directory, prefix="in-", suffix=".inflated.part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for out in inflate_pieces(pieces, limit):
                f.write(out)
                size += len(out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    return SpooledDataset(Path(name), 0, size, owned=True)
