"""The durable, content-addressed instance store (the file system edge).

It lives beside the event log because it is the other half of the durable record: events
name files by ``store_key``, and every part reads them (ingest writes received instances,
the review pages and the XNAT feedback write corrected segmentations, the engine reads).

An instance is written to a temporary file in the store's own ``tmp/`` folder (same
file system), fsynced, renamed to ``ab/<sha256>.dcm`` and the folder fsynced: after
``put`` returns, the bytes survive a crash, and a reader never sees half a file. The
key (``store_key`` in events) is the path relative to the store root, so the store can
move. Identical bytes land on the same key, so writing them twice keeps one file.

One level of 256 folders, all made when the store is opened: creating a folder on the
receiver's path cost a journal commit each (two per instance with the ``ab/cd/`` layout
of earlier versions, whose 65,536 leaves fill only after about 700,000 instances), which
was 15-20% of ingest throughput (``lastmile bench ingest``). Ten million instances make
~40,000 files per folder, which ext4 and XFS index. Files written with the old layout
stay where their events say they are (``find``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from events.errors import OutOfSpace, StoreError


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    store_key: str
    size_bytes: int
    created: bool  # False when the same bytes were already on disk
    #: False after ``put(durable=False)``: the data and the folder's entry for the file
    #: still need an fsync, which ``sync`` does
    durable: bool = True


def key_for(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256}.dcm"


def legacy_key_for(sha256: str) -> str:
    """Where versions before the one-level layout put these bytes."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}.dcm"


FOLDERS = tuple(f"{i:02x}" for i in range(256))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """Content-addressed files under ``root``; thread-safe (associations write in parallel)."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._make_folders()

    def _make_folders(self) -> None:
        """The 256 ``ab/`` folders, made (and their entries fsynced) once."""
        if not (self.root / FOLDERS[-1]).is_dir():
            try:
                for name in FOLDERS:
                    (self.root / name).mkdir(exist_ok=True)
                _fsync_dir(self.root)
            except OSError as exc:
                raise StoreError(f"cannot prepare the instance store in {self.root} "
                                 f"({exc.strerror}); check permissions and free space") from None

    def path(self, store_key: str) -> Path:
        return self.root / store_key

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int = 0) -> None:
        """Raise ``OutOfSpace`` if writing ``incoming`` bytes would leave less than the
        threshold free."""
        if self.min_free_bytes <= 0:
            return
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise OutOfSpace(
                f"only {free // 2**20} MiB free under {self.root}; the store refuses new data "
                f"below {self.min_free_bytes // 2**20} MiB (LASTMILE_DICOM_MIN_FREE_MB)"
            )

    def put(self, chunks: Iterable[bytes | memoryview], sha256: str | None = None, *,
            durable: bool = True, size: int | None = None) -> StoredFile:
        """Make ``b"".join(chunks)`` durable under its SHA-256; raise ``StoreError`` if not.

        ``sha256`` may be passed when the caller already hashed the bytes. With
        ``durable=False`` the complete file is under its final name when this returns (it
        survives a crash of this process: the rename comes after the last write), but the
        caller must call ``sync`` before relying on it surviving a power failure. The
        receiver overlaps that ``sync`` with the event publish and answers Success only
        after both; a name that a power failure left short is caught by ``intact``.
        With both ``sha256`` and ``size`` given, ``chunks`` is read once and may be a
        generator, so a large instance is copied piece by piece.
        """
        if size is None or sha256 is None:
            chunks = list(chunks)
            size = sum(len(c) for c in chunks)
        # else ``chunks`` may be a one-pass iterable (a file read in pieces): it is
        # consumed once, by the write below
        self.check_space(size)
        if sha256 is None:
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)
            sha256 = h.hexdigest()
        key = key_for(sha256)
        final = self.root / key
        if self.intact(key, size):
            return StoredFile(sha256, key, size, created=False)
        tmp_name: str | None = None
        try:
            parent = final.parent  # one of the folders made at open
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="in-", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                for c in chunks:
                    f.write(c)
                f.flush()
                if durable:
                    os.fdatasync(f.fileno())  # data + size; the rename is made durable below
            os.replace(tmp_name, final)
            tmp_name = None
            if durable:
                _fsync_dir(parent)
        except OSError as exc:
            raise StoreError(
                f"cannot write instance {sha256[:12]}… to {self.root} ({exc.strerror}); "
                "check free space and permissions of the state directory"
            ) from None
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return StoredFile(sha256, key, size, created=True, durable=durable)

    def sync(self, stored: StoredFile) -> None:
        """Finish a ``put(durable=False)``: the file's data, then its directory entry."""
        if stored.durable:
            return
        path = self.root / stored.store_key
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot sync {stored.store_key} to disk ({exc.strerror}); "
                             "check the disk of the state directory") from None

    def find(self, sha256: str, size: int) -> str | None:
        """The key of an intact copy of these bytes, in this layout or the old one."""
        for key in (key_for(sha256), legacy_key_for(sha256)):
            if self.intact(key, size):
                return key
        return None

    def intact(self, store_key: str, size: int) -> bool:
        """The file under ``store_key`` exists with ``size`` bytes. A power failure between
        the rename and ``sync`` can leave a name with fewer bytes; then the sender's retry
        (it got no Success) writes it again."""
        try:
            return (self.root / store_key).stat().st_size == size
        except OSError:
            return False

    def discard(self, stored: StoredFile) -> None:
        """Undo a ``put`` whose event could not be recorded (only a file it created)."""
        if stored.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / stored.store_key)

    def leftovers(self) -> list[Path]:
        """Temporary files left by a crash mid-write (removed by ``clean_tmp``)."""
        return sorted(self.tmp.glob("in-*.part"))

    def clean_tmp(self) -> int:
        n = 0
        for p in self.leftovers():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        return n
