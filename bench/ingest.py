"""``lastmile bench ingest``: C-STORE throughput of our SCP against dcmtk storescp and
Orthanc in the same run, and study-completion latency.

Everything runs on loopback in a fresh temporary directory with a fresh embedded
nats-server (fsync "always", what ``lastmile up`` uses), so a bench never touches a
site's log or store. The sender is always dcmtk ``storescu`` with ``TCP_NODELAY=1``;
each receiver gets the same files over one association (and then over two concurrent
associations). Our SCP answers Success only after the file is fsynced and the
``instance stored`` event is acknowledged; storescp and Orthanc do neither.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from bench.peers import Orthanc, PeerError, Storescp, dcmtk_env, orthanc_binary
from events.catalogue import StudyCompleted
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from events.subjects import subject_for, type_filter
from ingest.app import IngestApp, IngestOptions
from ingest.dicom_scp import ScpConfig
from ingest.rules_file import RulesFile

SECRET = b"bench-secret-not-a-site-secret-0"
FLOOR_SUBJECT = subject_for("bench.floor", None)


@dataclass
class ReceiverRun:
    receiver: str
    associations: int
    instances: int
    seconds: float
    mb_per_s: float
    instances_per_s: float


@dataclass
class IngestBench:
    count: int
    instance_bytes: int
    studies: int
    runs: list[ReceiverRun] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    completion_p50_s: float = 0.0
    completion_p90_s: float = 0.0
    completion_reasons: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-min load at start and end


def ct_instances(out: Path, count: int, *, study_uid: str | None = None,
                 series_per_study: int = 1, seed: int = 0) -> list[Path]:
    """``count`` CT instances, 512x512 16-bit (~0.5 MB), one study, written with pydicom."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series = [generate_uid() for _ in range(series_per_study)]
    # one noisy body-like slab; each slice gets a different offset (cheap, not constant)
    base = (rng.normal(40, 300, (512, 512)).clip(-1024, 3000) + 1024).astype(np.uint16)
    paths = []
    for i in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series[i % series_per_study]
        ds.Modality = "CT"
        ds.PatientName = "Bench^Synthetic"
        ds.PatientID = "BENCH-0001"
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.BodyPartExamined = "ABDOMEN"
        ds.StudyDescription = "CT ABDOMEN (synthetic)"
        ds.SeriesDescription = f"AXIAL {i % series_per_study + 1}"
        ds.SeriesNumber = i % series_per_study + 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.Rows, ds.Columns = 512, 512
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


async def _storescu(port: int, called: str, files: list[Path]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
        *[str(f) for f in files], env=dcmtk_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, errout = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise PeerError(f"storescu failed ({proc.returncode}): {errout[-400:]!r}")


async def _send(name: str, port: int, called: str, files: list[Path], associations: int,
                ) -> ReceiverRun:
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    await asyncio.gather(*[_storescu(port, called, c) for c in chunks])
    seconds = time.perf_counter() - t0
    total = sum(f.stat().st_size for f in files)
    return ReceiverRun(name, associations, len(files), round(seconds, 3),
                       round(total / seconds / 1e6, 1), round(len(files) / seconds, 1))


async def _ours(bus_settings: BusSettings, root: Path, files: list[Path], associations: int,
                tag: str, chunked: bool = True) -> ReceiverRun:
    """Our SCP as `lastmile up` runs it; with ``chunked=False`` data sets are received in
    memory (pynetdicom's default) instead of to disk: what the memory bound costs."""
    stream = BusSettings(**{**bus_settings.__dict__, "stream": f"BENCH_{tag}"})
    bus = await EventBus.connect(stream)
    options = IngestOptions(instances_dir=root / f"instances-{tag}",
                            scp=ScpConfig(port=free_port(), max_associations=4,
                                          chunked_receive=chunked),
                            min_free_bytes=0)
    app = IngestApp(options, SECRET, RulesFile.open(None))
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(bus, stop))
    try:
        await asyncio.wait_for(app.scp.started.wait(), 30)
        assert app.scp.port is not None
        name = ("lastmile SCP (fsync + acked event)" if chunked else
                "in-memory receive: lastmile SCP without chunked receive")
        run = await _send(name, app.scp.port, "LM_LTS", files,
                          associations)
        stored = len(list((root / f"instances-{tag}").glob("*/*.dcm")))
        if stored != len(files):
            raise PeerError(f"our SCP stored {stored} of {len(files)} files")
        return run
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await bus.js.delete_stream(stream.stream)
        await bus.close()


async def _bare_pynetdicom(root: Path, files: list[Path], associations: int,
                           bus: EventBus | None = None) -> ReceiverRun:
    """The framework's floor: a pynetdicom SCP that writes ``encoded_dataset()`` to a file
    (no fsync, no parsing, no event) - what any Python SCP costs before doing its job.
    It gets the same DUL poll interval as ours (``ScpConfig.dul_poll_s``), so the ratio
    to it is the cost of our store-and-publish alone.

    With ``bus``: the guarantees and nothing else - the file fsynced while one event of
    an ``instance stored``'s size is published and acknowledged (fsync ``always``), no
    header decode, hash, routing or store layout. No pynetdicom receiver that keeps
    our promise to the sender can be faster than this row on the same machine.
    """
    from pynetdicom import AE, evt
    from pynetdicom.presentation import StoragePresentationContexts

    name = "pynetdicom + fsync + acked event" if bus else "bare pynetdicom SCP (write only)"
    out = root / f"{'floor' if bus else 'bare'}-{associations}"
    out.mkdir()
    counter = iter(range(10**9))
    loop = asyncio.get_running_loop()
    body = b"{}" + b" " * 700  # about an encoded ``instance stored``

    def handle(event: evt.Event) -> int:
        n = next(counter)
        acked = None
        if bus is not None:
            acked = asyncio.run_coroutine_threadsafe(bus.js.publish(
                FLOOR_SUBJECT, body, headers={"Nats-Msg-Id": f"{associations}-{n}"}), loop)
        with open(out / f"{n}.dcm", "wb") as f:
            f.write(event.encoded_dataset())
            if bus is not None:
                f.flush()
                os.fdatasync(f.fileno())
        if acked is not None:
            acked.result(30)
        return 0x0000

    def tune(event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = ScpConfig().dul_poll_s

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 4
    for cx in StoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle),
                                           (evt.EVT_CONN_OPEN, tune)])
    assert server is not None
    try:
        return await _send(name, port, "BARE", files, associations)
    finally:
        await asyncio.to_thread(server.shutdown)


async def _pynetdicom_floor(bus_settings: BusSettings, root: Path, files: list[Path],
                            associations: int) -> ReceiverRun:
    stream = BusSettings(**{**bus_settings.__dict__, "stream": f"BENCH_FLOOR{associations}"})
    bus = await EventBus.connect(stream)
    try:
        return await _bare_pynetdicom(root, files, associations, bus)
    finally:
        await bus.js.delete_stream(stream.stream)
        await bus.close()


async def _completion(bus_settings: BusSettings, root: Path, studies: int,
                      per_study: int) -> tuple[list[float], dict[str, int]]:
    """Send ``studies`` studies, one association each; latency = last instance -> completed."""
    stream = BusSettings(**{**bus_settings.__dict__, "stream": "BENCH_COMPLETION"})
    bus = await EventBus.connect(stream)
    options = IngestOptions(instances_dir=root / "instances-completion",
                            scp=ScpConfig(port=free_port()), min_free_bytes=0)
    app = IngestApp(options, SECRET, RulesFile.open(None))
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(bus, stop))
    try:
        await asyncio.wait_for(app.scp.started.wait(), 30)
        assert app.scp.port is not None
        for s in range(studies):
            files = await asyncio.to_thread(ct_instances, root / f"study{s:02d}", per_study,
                                            seed=s)
            await _storescu(app.scp.port, "LM_LTS", files)
        deadline = time.monotonic() + 60
        done: list[StudyCompleted] = []
        while time.monotonic() < deadline and len(done) < studies:
            await asyncio.sleep(0.5)
            done = [ev async for _, ev, _ in bus.read(
                filter_subject=type_filter("ingest.study.completed"))
                if isinstance(ev, StudyCompleted)]
        if len(done) < studies:
            raise PeerError(f"only {len(done)} of {studies} studies completed within 60 s")
        reasons: dict[str, int] = {}
        for ev in done:
            reasons[str(ev.reason)] = reasons.get(str(ev.reason), 0) + 1
        return [ev.latency_s for ev in done], reasons
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await bus.js.delete_stream(stream.stream)
        await bus.close()


async def run_ingest_bench(count: int = 200, studies: int = 20, peers: bool = True,
                           per_study: int = 5) -> IngestBench:
    loggers = [logging.getLogger(n) for n in ("ingest", "pynetdicom")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # per-study and per-request lines are noise here (and cost time)
        lg.setLevel(logging.WARNING)
    try:
        return await _run(count, studies, peers, per_study)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


async def _run(count: int, studies: int, peers: bool, per_study: int) -> IngestBench:
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-ingest-") as tmp:
        root = Path(tmp)
        files = await asyncio.to_thread(ct_instances, root / "ct", count)
        result = IngestBench(count=count, instance_bytes=files[0].stat().st_size,
                             studies=studies)
        with EmbeddedNats(root / "nats", port=free_port(), sync="always") as server:
            settings = BusSettings(servers=(server.url,), stream="BENCH")
            for associations in (1, 2):
                if peers:
                    with Storescp(root / f"storescp-{associations}", free_port()) as scp:
                        result.runs.append(await _send(
                            "dcmtk storescp (+B)", scp.port, scp.ae_title, files, associations))
                    if orthanc_binary():
                        with Orthanc(root / f"orthanc-{associations}", free_port(),
                                     free_port()) as pacs:
                            result.runs.append(await _send(
                                "Orthanc 1.x (SQLite)", pacs.dicom_port, pacs.ae_title, files,
                                associations))
                            got = pacs.count_instances()
                            if got != count:
                                raise PeerError(f"Orthanc stored {got} of {count}")
                    else:
                        result.notes.append("Orthanc not installed: no Orthanc figures")
                if peers:
                    result.runs.append(await _bare_pynetdicom(root, files, associations))
                    result.runs.append(await _pynetdicom_floor(settings, root, files,
                                                               associations))
                result.runs.append(await _ours(settings, root, files, associations,
                                               f"A{associations}"))
                result.runs.append(await _ours(settings, root, files, associations,
                                               f"M{associations}", chunked=False))
            latencies, reasons = await _completion(settings, root, studies, per_study)
        result.completion_p50_s = round(statistics.median(latencies), 3)
        result.completion_p90_s = round(float(np.percentile(latencies, 90)), 3)
        result.completion_reasons = reasons
    result.load_average = (round(load_start, 2), round(os.getloadavg()[0], 2))
    by = {(r.receiver.split()[0], r.associations): r.mb_per_s for r in result.runs}
    for a in (1, 2):
        ours = by.get(("lastmile", a))
        if ours is None:
            continue
        if by.get(("Orthanc", a)):
            result.ratios[f"lastmile/orthanc ({a} assoc)"] = round(ours / by[("Orthanc", a)], 3)
        if by.get(("bare", a)):
            result.ratios[f"lastmile/bare pynetdicom ({a} assoc)"] = round(
                ours / by[("bare", a)], 3)
        if by.get(("pynetdicom", a)):
            result.ratios[f"lastmile/pynetdicom + fsync + acked event ({a} assoc)"] = round(
                ours / by[("pynetdicom", a)], 3)
        if by.get(("pynetdicom", a)) and by.get(("Orthanc", a)):
            result.ratios[f"pynetdicom + fsync + acked event/orthanc ({a} assoc)"] = round(
                by[("pynetdicom", a)] / by[("Orthanc", a)], 3)
        if by.get(("dcmtk", a)):
            result.ratios[f"lastmile/storescp ({a} assoc)"] = round(ours / by[("dcmtk", a)], 3)
    return result
