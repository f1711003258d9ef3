"""The receiver against hostile or broken peers (issue 18 items 4-6, issue 14 item 6),
over real sockets: raw TCP for what no DICOM tool sends, dcmtk for the modalities that
must still be served. Each would fail on main: there the 4 GiB request was buffered,
idle connections held the association slots, a malformed request was aborted without a
trace, a deflate bomb was inflated whole, a UID in another study replaced nothing but
was stored as a "version", and undeclared text was copied into events."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config

from bench.ingest import ct_instances
from events.catalogue import ConnectionRefused, InstanceRejected, InstanceStored
from events.jetstream import EventBus
from events.subjects import type_filter
from ingest.dataset import file_meta
from ingest.statuses import StoreStatus
from tests.ingest.conftest import StartIngest, needs_dcmtk, run_tool, storescu, wait_for_events

pytestmark = [pytest.mark.server, needs_dcmtk]

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: bytes = b"LM_BTS", calling: bytes = b"PROBE",
                 abstract: str = VERIFICATION) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) with raw AE title bytes."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16, b" ")[:16] + \
        calling.ljust(16, b" ")[:16] + b"\x00" * 32
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    body += _item(0x20, b"\x01\x00\x00\x00" + _item(0x30, abstract.encode())
                  + _item(0x40, EXPLICIT_LE.encode()))
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _read_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


async def refused(bus: EventBus, code: str, count: int = 1,
                  timeout: float = 15.0) -> list[ConnectionRefused]:
    evs = await wait_for_events(bus, None, "ingest.connection.refused", count=1,
                                subject=type_filter("ingest.connection.refused"),
                                timeout=timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        evs = [e async for _, e, _ in bus.read(
            filter_subject=type_filter("ingest.connection.refused"))]
        mine = [e for e in evs if isinstance(e, ConnectionRefused) and e.reason_code == code]
        if sum(e.refused_count for e in mine) >= count or loop.time() > deadline:
            return mine
        await asyncio.sleep(0.2)


async def echo_ok(port: int) -> bool:
    rc, _ = await run_tool("echoscu", "-aec", "LM_BTS", "127.0.0.1", str(port), timeout=30)
    return rc == 0


# --------------------------------------------------------------------------- PDUs


async def test_a_4_gib_association_request_is_refused_from_its_header(
        start_ingest: StartIngest, bus: EventBus) -> None:
    r = await start_ingest()

    def bomb() -> tuple[int, float]:
        s = _connect(r.port)
        s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
        t0 = time.monotonic()
        sent = 0
        chunk = b"\x00" * 65536
        s.settimeout(5)
        try:
            while sent < 256 << 20 and time.monotonic() - t0 < 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the receiver closed the connection
        s.close()
        return sent, time.monotonic() - t0

    sent, _ = await asyncio.to_thread(bomb)
    assert sent < 64 << 20  # closed long before the 256 MiB we tried (socket buffers only)
    (ev,) = await refused(bus, "request_pdu_too_large")
    assert ev.source_address == "127.0.0.1" and "4294967280" in ev.reason
    assert await echo_ok(r.port)


async def test_a_pdu_larger_than_declared_is_refused_after_acceptance(
        start_ingest: StartIngest, bus: EventBus) -> None:
    r = await start_ingest(max_pdu=65536)

    def oversized() -> bytes:
        s = _connect(r.port)
        s.sendall(associate_rq())
        s.settimeout(5)
        ac = s.recv(65536)
        assert ac[0] == 0x02  # A-ASSOCIATE-AC
        s.sendall(struct.pack(">BBL", 0x04, 0, 512 << 20))  # a 512 MiB P-DATA-TF
        return _read_until_closed(s, 5)

    await asyncio.to_thread(oversized)
    (ev,) = await refused(bus, "pdu_too_large")
    assert str(512 << 20) in ev.reason
    assert await echo_ok(r.port)


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize(("called", "calling", "rsd"), [
    (b"LM_BTS", b"\xc3\xa9CHO\xff", (1, 1, 3)),   # calling AE outside the repertoire
    (b"LM\\BTS", b"PROBE", (1, 1, 7)),            # backslash in the called AE
    (b"LM_BTS", b"          ", (1, 1, 3)),        # calling AE of spaces only
], ids=["non-ascii-calling", "backslash-called", "empty-calling"])
async def test_a_request_a_strict_parser_refuses_gets_an_a_associate_rj(
        start_ingest: StartIngest, bus: EventBus, called: bytes, calling: bytes,
        rsd: tuple[int, int, int]) -> None:
    r = await start_ingest()

    def probe() -> bytes:
        s = _connect(r.port)
        s.sendall(associate_rq(called, calling))
        return _read_until_closed(s, 5)

    answer = await asyncio.to_thread(probe)
    assert answer[:1] == b"\x03", answer[:16]  # A-ASSOCIATE-RJ, not an abort
    assert tuple(answer[7:10]) == rsd
    (ev,) = await refused(bus, "malformed_request")
    assert ev.source_address == "127.0.0.1" and "AE title" in ev.reason
    assert await echo_ok(r.port)


async def test_a_request_that_does_not_decode_gets_an_a_associate_rj(
        start_ingest: StartIngest, bus: EventBus) -> None:
    r = await start_ingest()
    rq = bytearray(associate_rq())
    rq[74 + 2:74 + 4] = struct.pack(">H", 0xFFF0)  # application context item overruns

    def probe() -> bytes:
        s = _connect(r.port)
        s.sendall(bytes(rq))
        return _read_until_closed(s, 5)

    answer = await asyncio.to_thread(probe)
    assert answer[:1] == b"\x03" and tuple(answer[7:10]) == (1, 1, 1)
    await refused(bus, "malformed_request")


# --------------------------------------------------------------------------- connections


async def test_idle_connections_neither_lock_out_modalities_nor_stay(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    """Twenty connections from other addresses that never send a request: a modality
    still stores at once (main: "Local Limit Exceeded"), and each idle connection is
    closed after the request timeout with a recorded refusal."""
    r = await start_ingest(max_associations=2, request_timeout_s=1.5,
                           max_connections_per_address=8)
    idle = [_connect(r.port, f"127.0.0.{2 + i % 4}") for i in range(20)]
    try:
        files = ct_instances(tmp_path / "ct", 3)
        t0 = time.monotonic()
        rc, out = await storescu(r.port, files, called="LM_LTS")
        assert rc == 0, out
        assert time.monotonic() - t0 < 5.0
        closed = await asyncio.to_thread(
            lambda: [_read_until_closed(s, 6) == b"" for s in idle])
        assert all(closed)
    finally:
        for s in idle:
            s.close()
    evs = await refused(bus, "no_association_request", count=20)
    assert sum(e.refused_count for e in evs) == 20
    assert {e.source_address for e in evs} == {f"127.0.0.{k}" for k in (2, 3, 4, 5)}


async def test_connections_per_address_are_bounded_and_refusals_folded(
        start_ingest: StartIngest, bus: EventBus) -> None:
    r = await start_ingest(max_connections_per_address=4, request_timeout_s=30)
    held = [_connect(r.port, "127.0.0.9") for _ in range(4)]
    try:
        extra = [_connect(r.port, "127.0.0.9") for _ in range(30)]
        closed = await asyncio.to_thread(
            lambda: [_read_until_closed(s, 3) == b"" for s in extra])
        assert all(closed)  # closed at once, nothing read
        for s in extra:
            s.close()
        assert await echo_ok(r.port)  # another address is unaffected
    finally:
        for s in held:
            s.close()
    evs = await refused(bus, "too_many_from_address", count=30)
    assert sum(e.refused_count for e in evs) == 30
    assert len(evs) < 30  # a burst is folded, not one event per connection
    assert all(e.source_address == "127.0.0.9" for e in evs)


async def test_association_limit_rejects_with_local_limit_and_an_event(
        start_ingest: StartIngest, bus: EventBus) -> None:
    r = await start_ingest(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(VERIFICATION)
    held = await asyncio.to_thread(ae.associate, "127.0.0.1", r.port, ae_title="LM_BTS")
    try:
        assert held.is_established
        rc, out = await run_tool("echoscu", "-v", "-aec", "LM_BTS", "127.0.0.1", str(r.port))
        assert rc != 0 and "Local Limit Exceeded" in out
    finally:
        await asyncio.to_thread(held.release)
    (ev,) = await refused(bus, "too_many_associations")
    assert ev.called_ae == "LM_BTS" and ev.calling_ae == "ECHOSCU"


# --------------------------------------------------------------------------- instances


def _deflate_bomb(inflated: int) -> tuple[str, bytes]:
    """A valid deflated CT header followed by an OB element of ``inflated`` zero bytes."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    header = buf.getvalue()
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = comp.compress(header + element)
    zeros = b"\x00" * (1 << 20)
    for _ in range(inflated >> 20):
        out += comp.compress(zeros)
    return str(ds.SOPInstanceUID), out + comp.flush()


def send_raw(port: int, path: Path, called: str = "LM_BTS") -> int:
    """C-STORE a Part 10 file's data set bytes as they are, proposing only its transfer
    syntax (pynetdicom's chunked send reads the file, it never re-encodes it): what an
    attacker's sender does with a deflate bomb."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
        assoc.release()


async def test_a_deflate_bomb_is_refused_by_its_inflated_size(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    r = await start_ingest(max_instance_bytes=16 << 20)
    sop_uid, body = _deflate_bomb(64 << 20)
    assert len(body) < 1 << 20  # under 1 MB on the wire, 64 MiB inflated

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(file_meta(CTImageStorage, sop_uid, DeflatedExplicitVRLittleEndian) + body)
    status = await asyncio.to_thread(send_raw, r.port, bomb)
    assert status == StoreStatus.REFUSED_DATASET_TOO_LARGE
    evs = await wait_for_events(bus, None, "ingest.instance.rejected",
                                subject=type_filter("ingest.instance.rejected"))
    (ev,) = [e for e in evs if isinstance(e, InstanceRejected)]
    assert ev.reason_code == "inflates_too_large"
    assert list(r.instances_dir.glob("*/*.dcm")) == []


async def test_one_uid_in_another_series_is_an_identity_conflict_and_the_first_is_kept(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    r = await start_ingest()
    (path,) = ct_instances(tmp_path / "first", 1)
    first = pydicom.dcmread(path)
    assert (await storescu(r.port, [path], called="LM_LTS"))[0] == 0
    # same study and series, other bytes: a new version (stored)
    first.SeriesDescription = "AXIAL corrected"
    first.save_as(tmp_path / "v2.dcm", enforce_file_format=True)
    assert (await storescu(r.port, [tmp_path / "v2.dcm"], called="LM_LTS"))[0] == 0
    # same UID in another series, then in another study: conflicts, refused
    other_series = pydicom.dcmread(path)
    other_series.SeriesInstanceUID = pydicom.uid.generate_uid()
    other_series.save_as(tmp_path / "series.dcm", enforce_file_format=True)
    other_study = pydicom.dcmread(path)
    other_study.StudyInstanceUID = pydicom.uid.generate_uid()
    other_study.save_as(tmp_path / "study.dcm", enforce_file_format=True)
    for name in ("series.dcm", "study.dcm"):
        rc, out = await storescu(r.port, [tmp_path / name], called="LM_LTS", extra=("-v",))
        assert "Status: 0x111" in out, out  # dcmtk prints the code it does not name
    stored = [e for e in await wait_for_events(bus, first.StudyInstanceUID,
                                               "ingest.instance.stored", 2)
              if isinstance(e, InstanceStored)]
    assert [e.version for e in stored] == [1, 2]
    conflicts = [e for e in await wait_for_events(
        bus, None, "ingest.instance.rejected", 2,
        subject=type_filter("ingest.instance.rejected")) if isinstance(e, InstanceRejected)]
    assert {e.reason_code for e in conflicts} == {"identity_conflict"}
    assert {e.study_uid for e in conflicts} == {first.StudyInstanceUID,
                                                other_study.StudyInstanceUID}
    assert all(e.first_study_uid == first.StudyInstanceUID
               and e.first_series_uid == first.SeriesInstanceUID for e in conflicts)
    assert all(e.status == StoreStatus.REFUSED_DUPLICATE_SOP_INSTANCE for e in conflicts)
    assert len(list(r.instances_dir.glob("*/*.dcm"))) == 2  # the two versions only


async def test_text_in_an_undeclared_character_set_is_flagged_not_copied(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    r = await start_ingest()
    (path,) = ct_instances(tmp_path / "a", 1)
    ds = pydicom.dcmread(path)
    assert "SpecificCharacterSet" not in ds
    ds["SeriesDescription"].value = "Schädel axial".encode()  # UTF-8 bytes, undeclared
    ds.add_new("InstitutionName", "LO", "Klinikum Süd".encode("latin-1"))
    ds.save_as(path, enforce_file_format=True)
    declared = tmp_path / "declared.dcm"
    ok = pydicom.dcmread(path)
    ok.SOPInstanceUID = pydicom.uid.generate_uid()
    ok.SeriesInstanceUID = pydicom.uid.generate_uid()
    ok.SpecificCharacterSet = "ISO_IR 192"
    ok["SeriesDescription"].value = "Schädel axial".encode()
    ok.add_new("InstitutionName", "LO", "Klinikum Süd".encode())
    ok.save_as(declared, enforce_file_format=True)
    assert (await storescu(r.port, [path, declared], called="LM_LTS"))[0] == 0
    stored = {e.sop_instance_uid: e for e in await wait_for_events(
        bus, ds.StudyInstanceUID, "ingest.instance.stored", 2) if isinstance(e, InstanceStored)}
    bad, good = stored[str(ds.SOPInstanceUID)], stored[str(ok.SOPInstanceUID)]
    assert set(bad.text_encoding_problems) == {"SeriesDescription", "InstitutionName"}
    assert bad.series_description is None and bad.institution is None  # no mojibake
    assert good.text_encoding_problems == ()
    assert (good.series_description, good.institution) == ("Schädel axial", "Klinikum Süd")


async def test_when_waiting_connections_are_full_the_oldest_goes_not_the_modality(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    r = await start_ingest(max_pending=4, request_timeout_s=30)
    idle = []
    assert r.app.scp.storage_scp is not None
    guard = r.app.scp.storage_scp.guard
    assert guard is not None
    for k in range(6):  # six idlers from six addresses, one at a time
        idle.append(_connect(r.port, f"127.0.1.{k + 1}"))
        # the next one only once the guard has taken this one in (and, from the fifth
        # on, closed the oldest): on a loaded machine a fixed pause does not order them
        if k >= 4:
            assert await asyncio.to_thread(_read_until_closed, idle[k - 4], 10) == b""
        for _ in range(200):
            if guard.counts()[1] == min(k + 1, 4):
                break
            await asyncio.sleep(0.05)
    try:
        rc, out = await storescu(r.port, ct_instances(tmp_path / "ct", 1), called="LM_LTS")
        assert rc == 0, out  # admitted: the longest-waiting idler made room
        closed = await asyncio.to_thread(lambda: [_read_until_closed(s, 1) == b""
                                                  for s in idle[:3]])
        assert all(closed)  # the three oldest were closed (for the 5th, 6th and storescu)
        alive = await asyncio.to_thread(lambda: _read_until_closed(idle[-1], 1))
        assert alive == b""  # nothing sent to the newest, and...
        idle[-1].setblocking(False)
        with pytest.raises(BlockingIOError):  # ...it is still open
            idle[-1].recv(1)
    finally:
        for s in idle:
            s.close()
    evs = await refused(bus, "too_many_pending", count=3)
    assert {e.source_address for e in evs} <= {"127.0.1.1", "127.0.1.2", "127.0.1.3"}
    assert sum(e.refused_count for e in evs) == 3


async def test_an_instance_outgrowing_the_limit_is_cut_off_while_arriving(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    """Received to disk, an instance must not fill the disk before the size check at its
    end: the connection is closed once its bytes pass the limit."""
    r = await start_ingest(max_instance_bytes=2 << 20)
    big = pydicom.dcmread(ct_instances(tmp_path / "ct", 1)[0])
    big.PixelData = big.PixelData * 16  # 8 MiB
    big.Rows = 512 * 16
    big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    rc, out = await storescu(r.port, [tmp_path / "big.dcm"], called="LM_LTS")
    assert rc != 0
    (ev,) = await refused(bus, "message_too_large")
    assert ev.source_address == "127.0.0.1"
    assert list(r.instances_dir.glob("*/*.dcm")) == []
    assert await echo_ok(r.port)


async def test_data_sets_are_received_into_the_stores_temporary_folder(
        start_ingest: StartIngest, tmp_path: Path) -> None:
    """pynetdicom's chunked receive writes where the store is (same disk, free-space
    check, leftovers cleaned at start), not to the system's temporary folder."""
    import pynetdicom.dimse_messages as messages

    r = await start_ingest()
    f = messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")  # as pynetdicom
    f.close()
    spooled = Path(f.name)
    assert spooled.parent == r.instances_dir / "tmp" and spooled.name.startswith("in-")
    assert r.app.scp.receiver is not None
    assert spooled in r.app.scp.receiver.store.leftovers()  # what clean_tmp removes
    spooled.unlink()
    assert (await storescu(r.port, ct_instances(tmp_path / "ct", 1), called="LM_LTS"))[0] == 0
    assert list((r.instances_dir / "tmp").iterdir()) == []  # removed after the handler
