"""Drills: attacks on the DICOM receiver (issue 18 items 4-8), against `lastmile up`
running only `ingest` in its own process, with its defaults unless a drill says
otherwise. Each reports the receiver process' peak resident memory (VmHWM from
/proc, before and after) or what real modalities got while it was under attack.

- deflate bomb: 1 MB on the wire inflating to 1 GiB, with the instance limit at
  512 MiB: refused (Out of Resources) by its inflated size; inflation goes to a
  bounded temporary file, never into memory.
- PDU bombs: four A-ASSOCIATE-RQs declaring 4 GiB, each streaming for up to 10 s:
  closed from the 6-byte header.
- a large instance: one 256 MiB image by storescu, received to disk in chunks.
- idle-connection flood: 10 addresses keep opening connections that never send a
  request (the guard's per-address and pending limits, 5 s request deadline), while a
  modality sends a study every second: all its studies are stored.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pydicom.uid import generate_uid as new_uid

from bench.ingest import ct_instances
from events.catalogue import ConnectionRefused, InstanceRejected, InstanceStored
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from events.subjects import type_filter
from ingest.dataset import file_meta
from ingest.statuses import StoreStatus
from tests.drills.procs import clean_env, lastmile_up, percentile, storescu
from tests.drills.report import record
from tests.ingest.test_receiver_guard import send_raw

pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="Debian dcmtk not installed"),
]

MiB = 1 << 20


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process' peak resident set size so far (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


class Receiver:
    """`lastmile up` with only ingest, on its own NATS; the bus to read its events."""

    def __init__(self, tmp: Path, services: str = '["ingest"]', **settings: str) -> None:
        self.tmp = tmp
        self.services = services
        self.port = free_port()
        self.server = EmbeddedNats(tmp / "nats", port=free_port(), sync="always")
        self.settings = settings

    async def __aenter__(self) -> Receiver:
        self.server.start()
        env = clean_env(state_dir=str(self.tmp / "state"), nats_url=self.server.url,
                        dicom_port=str(self.port), services=self.services,
                        dicom_min_free_mb="0", **self.settings)
        self.env = env
        self._up = lastmile_up(env, self.tmp / "up.log", wait_port=self.port)
        self.proc = self._up.__enter__()
        self.bus = await EventBus.connect(BusSettings(servers=(self.server.url,)))
        # warm up: one instance through the whole path, then take the baseline
        sent = await storescu(self.port, "LM_LTS", ct_instances(self.tmp / "warm", 2))
        assert sent.returncode == 0, sent.output[-2000:]
        self.baseline_mib = peak_rss_mib(self.proc.pid)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bus.close()
        self._up.__exit__(None, None, None)
        self.server.stop()

    def peak_mib(self) -> float:
        return peak_rss_mib(self.proc.pid)

    async def events(self, type_name: str) -> list[object]:
        return [e async for _, e, _ in self.bus.read(filter_subject=type_filter(type_name))]

    async def refusals(self, code: str, at_least: int,
                       timeout_s: float = 20.0) -> list[ConnectionRefused]:
        """The refusal events of ``code`` once they count ``at_least`` (bursts are
        folded and their counts published within the guard's 10 s window)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [e for e in await self.events("ingest.connection.refused")
                     if isinstance(e, ConnectionRefused) and e.reason_code == code]
            if sum(e.refused_count for e in found) >= at_least or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)


def _deflate_bomb(inflated: int) -> tuple[str, bytes]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = comp.compress(buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0,
                                                     inflated))
    zeros = b"\x00" * (16 * MiB)
    for _ in range(inflated // len(zeros)):
        out += comp.compress(zeros)
    return str(ds.SOPInstanceUID), out + comp.flush()


async def test_deflate_bomb_is_refused_with_memory_bounded(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    sop_uid, body = await asyncio.to_thread(_deflate_bomb, 1024 * MiB)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(file_meta(CTImageStorage, sop_uid, DeflatedExplicitVRLittleEndian) + body)
    async with Receiver(tmp_path, dicom_max_instance_mb="512") as r:
        t_send = time.perf_counter()
        status = await asyncio.to_thread(send_raw, r.port, path)
        answer_s = time.perf_counter() - t_send
        peak = r.peak_mib()
        rejected = [e for e in await r.events("ingest.instance.rejected")
                    if isinstance(e, InstanceRejected)]
        leftovers = list((tmp_path / "state" / "instances" / "tmp").glob("*"))
    assert status == StoreStatus.REFUSED_DATASET_TOO_LARGE
    assert [e.reason_code for e in rejected] == ["inflates_too_large"]
    assert leftovers == []
    growth = peak - r.baseline_mib
    assert growth < 128, f"the receiver grew by {growth:.0f} MiB"
    record("attack: deflate bomb",
           done=f"one C-STORE of {len(body) / MiB:.1f} MiB (Deflated Explicit VR LE) that "
                "inflates to 1 GiB, sent to `lastmile up` (ingest only) with the instance "
                "limit at 512 MiB",
           items=1, acknowledged=0, lost=0, duration_s=time.perf_counter() - t0,
           status=f"0x{status:04X} (Out of Resources), reason inflates_too_large",
           answered_after_s=round(answer_s, 2),
           receiver_peak_rss_mib_before=round(r.baseline_mib),
           receiver_peak_rss_mib_after=round(peak),
           temporary_files_left=len(leftovers))


def _pdu_bomb(port: int, seconds: float) -> tuple[int, float]:
    """Declare a 4 GiB A-ASSOCIATE-RQ and stream zeros until closed (or ``seconds``)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
    t0 = time.monotonic()
    sent = 0
    s.settimeout(2)
    chunk = b"\x00" * (1 << 16)
    try:
        while time.monotonic() - t0 < seconds:
            s.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    s.close()
    return sent, time.monotonic() - t0


async def test_pdu_bombs_are_closed_from_their_header(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    async with Receiver(tmp_path) as r:
        results = await asyncio.gather(*[asyncio.to_thread(_pdu_bomb, r.port, 10.0)
                                         for _ in range(4)])
        peak = r.peak_mib()
        sent = await storescu(r.port, "LM_LTS", ct_instances(tmp_path / "after", 2))
        refused = await r.refusals("request_pdu_too_large", 4)
    assert sent.returncode == 0, sent.output[-2000:]
    assert sum(e.refused_count for e in refused) == 4
    accepted = max(n for n, _ in results)
    assert accepted < 64 * MiB
    assert peak - r.baseline_mib < 64
    record("attack: 4 GiB association requests",
           done="four connections each declaring an A-ASSOCIATE-RQ of 4 GiB and streaming "
                "for up to 10 s, then a modality sends a study",
           items=4, acknowledged=0, lost=0, duration_s=time.perf_counter() - t0,
           most_bytes_a_bomb_got_in_mib=round(accepted / MiB, 2),
           closed_after_s=round(max(t for _, t in results), 2),
           receiver_peak_rss_mib_before=round(r.baseline_mib),
           receiver_peak_rss_mib_after=round(peak),
           modality_after="stored 2 of 2")


def _large_instance(path: Path, side: int) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "DRILL-LARGE", "Drill^Large"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, (side, side),
                                                     dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


async def test_a_large_instance_is_received_to_disk(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    path = await asyncio.to_thread(_large_instance, tmp_path / "large.dcm", 11584)
    size_mib = path.stat().st_size / MiB
    async with Receiver(tmp_path) as r:
        sent = await storescu(r.port, "LM_LTS", [path], timeout_s=300)
        peak = r.peak_mib()
        stored = [e for e in await r.events("ingest.instance.stored")
                  if isinstance(e, InstanceStored) and e.size_bytes > 100 * MiB]
    assert sent.returncode == 0 and len(sent.succeeded) == 1, sent.output[-2000:]
    assert len(stored) == 1
    growth = peak - r.baseline_mib
    assert growth < size_mib / 2, f"grew by {growth:.0f} MiB for a {size_mib:.0f} MiB instance"
    record("large instance received to disk",
           done=f"one {size_mib:.0f} MiB CT image by storescu to `lastmile up` (ingest "
                "only); pynetdicom's chunked receive, hashed and copied in 1 MiB pieces",
           items=1, acknowledged=1, lost=0, duration_s=time.perf_counter() - t0,
           receiver_peak_rss_mib_before=round(r.baseline_mib),
           receiver_peak_rss_mib_after=round(peak),
           send_s=round(sent.elapsed_s, 1))


async def _flood(port: int, stop: asyncio.Event, addresses: list[str]) -> int:
    """Keep opening idle connections from ``addresses`` until ``stop``: returns how many."""
    opened = 0
    held: list[socket.socket] = []

    def one(source: str) -> socket.socket | None:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            return s
        except OSError:
            s.close()
            return None

    while not stop.is_set():
        for source in addresses:
            for _ in range(10):  # more than the 8 allowed per address
                s = await asyncio.to_thread(one, source)
                if s is not None:
                    held.append(s)
                    opened += 1
        # drop those the receiver closed, keep the rest open
        alive = []
        for s in held:
            try:
                s.setblocking(False)
                if s.recv(1) == b"":
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                continue
            alive.append(s)
        held = alive
        await asyncio.sleep(0.2)
    for s in held:
        s.close()
    return opened


async def test_idle_connection_flood_does_not_lock_modalities_out(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    studies = [ct_instances(tmp_path / f"s{i}", 2, seed=i) for i in range(20)]
    quiet = [ct_instances(tmp_path / f"q{i}", 2, seed=100 + i) for i in range(5)]
    async with Receiver(tmp_path) as r:
        before = [await storescu(r.port, "LM_LTS", files, calling="QUIET") for files in quiet]
        assert all(s.returncode == 0 for s in before)
        stop = asyncio.Event()
        t_flood = time.perf_counter()
        flood = asyncio.create_task(_flood(r.port, stop, [f"127.0.0.{k}" for k in
                                                          range(2, 12)]))
        await asyncio.sleep(2.0)  # the flood is in full swing
        sends = []
        for files in studies:
            sends.append(await storescu(r.port, "LM_LTS", files, calling="MODALITY"))
            await asyncio.sleep(1.0)
        stop.set()
        opened = await flood
        flood_s = time.perf_counter() - t_flood
        await r.refusals("no_association_request", 1)
        await asyncio.sleep(16.0)  # the last idle ones reach their deadline, counts flushed
        refused = [e for e in await r.events("ingest.connection.refused")
                   if isinstance(e, ConnectionRefused)]
        stored = [e for e in await r.events("ingest.instance.stored")
                  if isinstance(e, InstanceStored) and e.calling_ae == "MODALITY"]
    ok = sum(len(s.succeeded) for s in sends)
    assert all(s.returncode == 0 for s in sends), [s.output[-500:] for s in sends
                                                   if s.returncode][:1]
    assert ok == len(stored) == 40
    by_reason: dict[str, int] = {}
    for e in refused:
        by_reason[e.reason_code] = by_reason.get(e.reason_code, 0) + e.refused_count
    assert by_reason.get("no_association_request", 0) > 0
    assert sum(by_reason.values()) >= opened * 0.9  # every idle connection is accounted for
    latencies = [s.elapsed_s for s in sends]
    record("attack: idle-connection flood",
           done=f"10 addresses kept {opened} idle connections coming for {flood_s:.0f} s "
                "(never an association request; 10 per address per round, 8 allowed) while "
                "a modality sent 20 studies of 2 CT images, one per second",
           items=40, acknowledged=ok, lost=40 - len(stored),
           duration_s=time.perf_counter() - t0,
           modality_studies_stored="20 of 20",
           study_send_p50_s_before_flood=round(percentile([b.elapsed_s for b in before], 50),
                                               2),
           study_send_p50_s=round(percentile(latencies, 50), 2),
           study_send_max_s=round(max(latencies), 2),
           refusals_recorded=", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())),
           refusal_events=len(refused))


async def test_a_receiver_under_an_idle_connection_flood_does_not_starve_the_engine(
        tmp_path: Path) -> None:
    """Issue 18 #8: the receiver and the engine share a process; while the receiver is
    flooded with idle connections, a modality's study is still received, run through its
    pipeline and published, within a bound, next to the same study's time without flood."""
    from demo.phantoms import pelvis_study
    from engine.spec import REFERENCE_DIR
    from tests.engine.conftest import has, wait_for
    from tests.engine.test_live_deploy import cli

    async with Receiver(tmp_path, services='["ingest", "engine"]') as r:
        r_ = await asyncio.to_thread(cli, r.env, "pipelines", "deploy",
                                     str(REFERENCE_DIR / "hfd.yaml"), "--stage", "validation",
                                     "--why", "the starvation drill")
        assert r_.returncode == 0, r_.stdout + r_.stderr

        async def one_study(seed: int) -> float:
            study = pelvis_study(seed, images=2, size=256)
            t = time.perf_counter()
            sent = await storescu(r.port, "LM_HFD", study.write(tmp_path / f"p{seed}"))
            assert sent.returncode == 0 and len(sent.succeeded) == 2, sent.output[-1000:]
            await wait_for(r.bus, study.study_uid, has("engine.inference.completed"), 240)
            return time.perf_counter() - t

        quiet_s = await one_study(1801)
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(r.port, stop, [f"127.0.0.{k}" for k in
                                                          range(2, 12)]))
        await asyncio.sleep(2.0)  # the flood is in full swing
        flooded_s: list[float] = []
        try:
            for i in range(4):  # over several rounds of the flood
                flooded_s.append(await one_study(1802 + i))
                await asyncio.sleep(1.0)
        finally:
            stop.set()
            opened = await flood
        refused = await r.refusals("no_association_request", 1)
    assert opened >= 100 and refused  # it was a flood, and the guard answered it
    # the engine kept up: each flooded study through receiver, completion, model and SR
    # within a generous multiple of the quiet one (the machine has 2 cores)
    assert max(flooded_s) < max(4 * quiet_s, 60.0), (quiet_s, flooded_s)
    record("attack: engine under an idle-connection flood",
           done=f"{opened} idle connections from 10 addresses while 4 HFD studies went "
                "through receiver, completion, model and SR in the same process",
           items=4, acknowledged=4, lost=0, duration_s=sum(flooded_s) + quiet_s,
           study_to_result_s_quiet=round(quiet_s, 1),
           study_to_result_s_flooded=", ".join(f"{s:.1f}" for s in flooded_s))
