"""The content-addressed store on a real file system, and dataset checks on real files."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from events.errors import OutOfSpace
from events.instance_store import InstanceStore, key_for, legacy_key_for
from ingest.dataset import check_structure, file_meta, parse
from ingest.errors import BadInstance
from ingest.statuses import StoreStatus

REAL_FILES = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
              "emri_small_RLE.dcm", "liver.dcm", "JPEG2000.dcm", "eCT_Supplemental.dcm"]


def dataset_bytes(path: str) -> tuple[bytes, str]:
    """The dataset part of a file (what a C-STORE carries) and its transfer syntax."""
    raw = Path(path).read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    # group 0002 length: the meta group ends at 132 + 12 + group length
    group_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + group_length:], str(ds.file_meta.TransferSyntaxUID)


def test_put_is_durable_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    data = (b"\x00" * 128, b"DICM", b"payload")
    first = store.put(data)
    assert first.created and first.sha256 == hashlib.sha256(b"".join(data)).hexdigest()
    assert first.store_key == f"{first.sha256[:2]}/{first.sha256}.dcm"
    assert store.path(first.store_key).read_bytes() == b"".join(data)
    again = store.put(data)
    assert not again.created and again.store_key == first.store_key
    assert store.leftovers() == []
    store.discard(again)  # did not create it: keeps the file
    assert store.path(first.store_key).exists()
    store.discard(first)
    assert not store.path(first.store_key).exists()


def test_the_store_opens_with_its_256_folders_and_finds_old_layout_files(
        tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "tmp") == \
        [f"{i:02x}" for i in range(256)]
    data = b"old layout bytes"
    sha = hashlib.sha256(data).hexdigest()
    assert store.find(sha, len(data)) is None
    old = tmp_path / legacy_key_for(sha)
    old.parent.mkdir()
    old.write_bytes(data)
    assert store.find(sha, len(data)) == legacy_key_for(sha)
    assert store.find(sha, len(data) + 1) is None  # a short or long copy is not intact
    new = store.put([data])
    assert new.created and store.find(sha, len(data)) == new.store_key == key_for(sha)


def test_free_space_threshold_refuses_new_data(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=2**62)
    with pytest.raises(OutOfSpace, match="LASTMILE_DICOM_MIN_FREE_MB"):
        store.put((b"x",))
    assert list(tmp_path.glob("*/*.dcm")) == []


def test_interrupted_writes_are_cleaned_at_start(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    (store.tmp / "in-crashed.part").write_bytes(b"half")
    assert store.clean_tmp() == 1 and store.leftovers() == []


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_files_pass_the_structure_check_and_truncations_do_not(name: str) -> None:
    dataset, ts = dataset_bytes(get_testdata_file(name))
    check_structure(dataset, ts)
    for cut in (len(dataset) - 1, len(dataset) // 2, 7):
        with pytest.raises(BadInstance) as info:
            check_structure(dataset[:cut], ts)
        assert info.value.status == StoreStatus.ERROR_CANNOT_UNDERSTAND


@pytest.mark.parametrize("name", [*REAL_FILES, "image_dfl.dcm"])
def test_header_decoded_from_the_received_bytes_matches_pydicom_reading_the_file(
        name: str) -> None:
    # implicit, big endian, deflated, encapsulated: read with the association's syntax
    dataset, ts = dataset_bytes(get_testdata_file(name))
    ds = parse(check_structure(dataset, ts), ts)
    whole = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                    "PatientName", "PixelSpacing"):
        assert ds.get(keyword) == whole.get(keyword), keyword
    assert ds.SOPInstanceUID  # not vacuous: every file has one
    assert "PixelData" not in ds


def test_file_meta_is_deterministic_and_parses() -> None:
    dataset, ts = dataset_bytes(get_testdata_file("CT_small.dcm"))
    ds0 = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    meta = file_meta(ds0.SOPClassUID, ds0.SOPInstanceUID, ts)
    assert meta == file_meta(ds0.SOPClassUID, ds0.SOPInstanceUID, ts)
    ds = parse(dataset, ts)
    assert ds.SOPInstanceUID == ds0.SOPInstanceUID
    assert "PixelData" not in ds  # facts never need the pixels
    whole = pydicom.dcmread(io.BytesIO(meta + dataset))
    assert whole.PixelData == ds0.PixelData
    assert whole.file_meta.TransferSyntaxUID == ts


def test_event_facts_keep_only_well_formed_descriptive_values() -> None:
    from ingest.dataset import fact_date, fact_text

    ds = pydicom.Dataset()
    ds.InstitutionName = "A" * 64
    ds.Manufacturer = "A" * 65  # longer than LO allows
    ds.StationName = "CT\\MR"  # two values where one is expected
    ds.ManufacturerModelName = "Model\x07X"  # a control character
    ds.SeriesDescription = "\x1b$B\x1b(B T1"  # ISO 2022 escapes are text, not control
    ds.StudyDate = "13.04.1937"  # day first, unambiguous: normalised
    ds.AcquisitionDate = "13.ZQX7.1937"  # unreadable: left out
    assert fact_text(ds, "InstitutionName") == "A" * 64
    assert fact_text(ds, "Manufacturer") is None
    assert fact_text(ds, "StationName") is None
    assert fact_text(ds, "ManufacturerModelName") is None
    assert fact_text(ds, "SeriesDescription") == "\x1b$B\x1b(B T1"
    assert fact_date(ds, "StudyDate") == "19370413"
    assert fact_date(ds, "AcquisitionDate") is None
    assert fact_date(ds, "ContentDate") is None
