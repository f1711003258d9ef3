"""Bad input: each gets a named DICOM failure status and an ``instance rejected`` event,
the SCP stays up, and nothing is stored. The peer is a scripted pynetdicom SCU sending
raw bytes (a real association on loopback)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from events.catalogue import InstanceRejected
from events.jetstream import EventBus
from events.subjects import type_filter
from ingest.statuses import StoreStatus
from tests.ingest.conftest import StartIngest, wait_for_events
from tests.ingest.test_store_and_dataset import dataset_bytes

pytestmark = pytest.mark.server

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def with_meta(source: str, dataset: bytes, out: Path, sop_class: str | None = None) -> Path:
    """A file whose meta says what the SCU will claim, followed by ``dataset`` bytes."""
    raw = Path(source).read_bytes()
    meta_ds = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    head = raw[: 132 + 12 + int(meta_ds.FileMetaInformationGroupLength)]
    if sop_class is not None:
        old = str(meta_ds.MediaStorageSOPClassUID).encode()
        new = sop_class.encode()
        new += b"\x00" * (len(old) - len(new)) if len(new) < len(old) else b""
        assert len(new) == len(old)
        head = head.replace(old, new, 1)
    out.write_bytes(head + dataset)
    return out


def truncated(tmp: Path) -> Path:
    data, _ = dataset_bytes(CT)
    return with_meta(CT, data[: len(data) - 1000], tmp / "truncated.dcm")


def not_dicom(tmp: Path) -> Path:
    return with_meta(CT, os.urandom(4096), tmp / "random.dcm")


def without(keyword: str) -> Callable[[Path], Dataset]:
    def build(tmp: Path) -> Dataset:
        ds = pydicom.dcmread(CT)
        delattr(ds, keyword)
        return ds
    return build


def missing_sop_instance(tmp: Path) -> Path:
    ds = pydicom.dcmread(CT)
    del ds.SOPInstanceUID
    buf = tmp / "nosop.dcm"
    ds.save_as(buf, enforce_file_format=False)
    data, _ = dataset_bytes(str(buf))
    return with_meta(CT, data, tmp / "nosop-meta.dcm")


def wrong_sop_class(tmp: Path) -> Path:
    data, _ = dataset_bytes(MR)  # an MR dataset offered as a CT Image
    return with_meta(MR, data, tmp / "mr-as-ct.dcm", sop_class=CTImageStorage)


CASES = [
    ("truncated", truncated, StoreStatus.ERROR_CANNOT_UNDERSTAND, {}),
    ("not-dicom", not_dicom, StoreStatus.ERROR_CANNOT_UNDERSTAND, {}),
    ("no-sop-instance-uid", missing_sop_instance, StoreStatus.ERROR_MISSING_REQUIRED_UID, {}),
    ("no-study-uid", without("StudyInstanceUID"), StoreStatus.ERROR_MISSING_REQUIRED_UID, {}),
    ("no-series-uid", without("SeriesInstanceUID"), StoreStatus.ERROR_MISSING_REQUIRED_UID, {}),
    ("sop-class-differs", wrong_sop_class,
     StoreStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS, {}),
    ("too-large", lambda tmp: Path(CT), StoreStatus.REFUSED_DATASET_TOO_LARGE,
     {"max_instance_bytes": 10_000}),
    ("disk-nearly-full", lambda tmp: Path(CT), StoreStatus.REFUSED_OUT_OF_RESOURCES,
     {"min_free_bytes": 2**62}),
]


def send(port: int, payload: Path | Dataset) -> tuple[int, int]:
    """C-STORE one payload, then C-ECHO on a new association: (store status, echo status).

    A file path is sent as its raw bytes after the meta (pynetdicom's chunked send), so
    broken datasets reach the SCP exactly as broken as they are on disk.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return _send(port, payload)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _send(port: int, payload: Path | Dataset) -> tuple[int, int]:
    ae = AE(ae_title="SCRIPTED")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LM_LTS")
    assert assoc.is_established
    status = assoc.send_c_store(payload)
    assoc.release()
    assoc = ae.associate("127.0.0.1", port, ae_title="LM_LTS")
    echo = assoc.send_c_echo()
    assoc.release()
    return int(status.Status), int(echo.Status)


@pytest.mark.parametrize(("name", "build", "expected", "options"), CASES,
                         ids=[c[0] for c in CASES])
async def test_bad_input_is_refused_with_a_named_status_and_recorded(
    start_ingest: StartIngest, bus: EventBus, tmp_path: Path, name: str,
    build: Callable[[Path], Path | Dataset], expected: StoreStatus, options: dict[str, int],
) -> None:
    r = await start_ingest(**options)
    payload = build(tmp_path)
    status, echo = await asyncio.to_thread(send, r.port, payload)
    assert status == expected, f"{name}: got 0x{status:04X}"
    assert echo == StoreStatus.SUCCESS  # the SCP is still up
    (ev,) = await wait_for_events(bus, None, "ingest.instance.rejected",
                                  subject=type_filter("ingest.instance.rejected"))
    assert isinstance(ev, InstanceRejected)
    assert ev.status == expected and ev.status_name == expected.name
    assert ev.reason and ev.called_ae == "LM_LTS" and ev.calling_ae == "SCRIPTED"
    assert list(r.instances_dir.glob("*/*.dcm")) == []
    assert list((r.instances_dir / "tmp").iterdir()) == []
    # and a good instance still goes through afterwards (unless the disk is "full")
    if expected is not StoreStatus.REFUSED_OUT_OF_RESOURCES and name != "too-large":
        good, _ = await asyncio.to_thread(send, r.port, Path(CT))
        assert good == StoreStatus.SUCCESS
