"""The folder scan and the sender, against a real pynetdicom Storage SCP on loopback that
accepts only what each test lets it (a PACS that refuses compressed syntaxes)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import EnhancedMRImageStorage  # type: ignore[attr-defined]

from events.nats_server import free_port
from sitecheck.folder import scan
from sitecheck.sender import Peer, send_study
from tests.corpus import sources

RLE_FILE = "emri_small_RLE.dcm"  # real enhanced MR, RLE Lossless (pydicom decodes RLE)
BIG_ENDIAN_FILE = "emri_small_big_endian.dcm"

pytestmark = pytest.mark.server


class Scp:
    """A Storage SCP for one SOP class and the given syntaxes; keeps what it received."""

    def __init__(self, syntaxes: list[str], status: int = 0x0000) -> None:
        self.received: list[tuple[str, Dataset]] = []
        self.status = status
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(EnhancedMRImageStorage, syntaxes)
        self.port = free_port()

    def _store(self, event: evt.Event) -> int:
        self.received.append((str(event.context.transfer_syntax), event.dataset))
        return self.status

    def __enter__(self) -> Scp:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    data = sources.pydicom_data_files()
    for name in (RLE_FILE, BIG_ENDIAN_FILE):
        shutil.copyfile(data / name, tmp_path / name)
    (tmp_path / "snapshot.gif").write_bytes(b"GIF89a" + bytes(200))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "catalog.xml").write_text("<catalog/>")
    yield tmp_path


def test_scan_groups_instances_by_study_and_names_what_it_skips(folder: Path) -> None:
    found = scan(folder)
    # the two real files are one image in two syntaxes: same study
    assert list(found.studies) == [pydicom.dcmread(folder / RLE_FILE).StudyInstanceUID]
    assert {f.transfer_syntax for f in found.studies[next(iter(found.studies))]} == {
        RLELossless, pydicom.uid.ExplicitVRBigEndian}
    assert sorted(s.path.name for s in found.skipped) == ["catalog.xml", "snapshot.gif"]
    assert all(s.reason for s in found.skipped)


def test_a_refused_compressed_syntax_is_decompressed_and_a_refused_big_endian_named(
        folder: Path) -> None:
    files = next(iter(scan(folder).studies.values()))
    with Scp([ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as scp:
        sent = send_study(files, Peer("127.0.0.1", scp.port, "PACS", "LM_CHECK"))
    by_name = {Path(f.path).name: f for f in sent.files}
    rle = by_name[RLE_FILE]
    assert rle.category == "Success" and rle.note and "decompressed from RLE" in rle.note
    big = by_name[BIG_ENDIAN_FILE]
    assert big.category == "Not sent" and big.status is None
    assert big.note and "Explicit VR Big Endian" in big.note
    # the receiver got the pixels of the original, uncompressed
    (received_ts, ds), = scp.received
    ts = pydicom.uid.UID(received_ts)
    assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    original = pydicom.dcmread(folder / RLE_FILE)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    assert (ds.pixel_array == original.pixel_array).all()
    assert sent.association == "released"


def test_each_file_goes_in_its_own_syntax_when_accepted_and_statuses_are_named(
        folder: Path) -> None:
    files = next(iter(scan(folder).studies.values()))
    with Scp([RLELossless, pydicom.uid.ExplicitVRBigEndian], status=0xA700) as scp:
        sent = send_study(files, Peer("127.0.0.1", scp.port, "PACS", "LM_CHECK"))
    assert sorted(ts for ts, _ in scp.received) == sorted(
        [RLELossless, pydicom.uid.ExplicitVRBigEndian])
    assert {(f.status, f.category, f.status_name, f.note) for f in sent.files} == {
        (0xA700, "Failure", "Refused: Out of Resources", None)}


def test_an_unreachable_receiver_is_recorded_for_every_file(folder: Path) -> None:
    files = next(iter(scan(folder).studies.values()))
    sent = send_study(files, Peer("127.0.0.1", free_port(), "PACS", "LM_CHECK", timeout_s=3))
    assert sent.association == "failed"
    assert all(f.category == "Not sent" and "no association" in (f.note or "")
               for f in sent.files)


def test_a_truncated_file_is_not_sent_and_says_why(tmp_path: Path) -> None:
    shutil.copyfile(sources.pydicom_data_files() / "emri_small_jpeg_2k_lossless_too_short.dcm",
                    tmp_path / "short.dcm")
    files = next(iter(scan(tmp_path).studies.values()))  # its header reads
    with Scp([ExplicitVRLittleEndian]) as scp:
        sent = send_study(files, Peer("127.0.0.1", scp.port, "PACS", "LM_CHECK"))
    (f,) = sent.files
    assert f.category == "Unreadable" and "truncated" in (f.note or "")
    assert scp.received == [] and sent.association == "released"
