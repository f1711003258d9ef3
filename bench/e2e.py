"""`lastmile bench e2e`: per pipeline, study completed -> result published, with the
per-stage p50/p90 and the platform's overhead; an Orthanc PACS is the peer that receives
the results when its binary is installed."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from engine.errors import EngineError
from engine.registry import deployed_event
from engine.spec import REFERENCE_DIR, LoadedPipeline, load_pipeline
from events.catalogue import (
    InferenceCompleted,
    InstanceStored,
    OperatorFinished,
    Stage,
    StudyCompleted,
)
from events.jetstream import EventBus

if TYPE_CHECKING:
    from engine.worker import EngineWorker, RunOutcome

STAGE_OF_OPERATOR = {
    "select_series": "selection",
    "load_volume": "load", "load_images": "load",
    "normalize": "preprocess", "resize_2d": "preprocess",
    "crop_to_labels": "preprocess",
    "batch_2d": "inference",
    "Invert": "postprocess", "argmax": "postprocess",
    "threshold": "postprocess", "volumes": "postprocess",
    "longitudinal": "postprocess", "detections": "postprocess",
    "write_seg": "seg_sr_write", "write_sr": "seg_sr_write",
}


def _monai_stages() -> dict[str, str]:
    """MONAI's operators by stage (engine.ops.transforms; names only, no MONAI import)."""
    from engine.ops import transforms

    return {**{n: "preprocess" for n in transforms.IMAGE_TRANSFORMS},
            **{n: "inference" for n in transforms.INFERERS},
            **{n: "postprocess" for n in transforms.LABEL_TRANSFORMS}}


STAGE_OF_OPERATOR.update(_monai_stages())


STAGES = ("transfer", "completion", "queue", "load", "selection", "preprocess", "inference",
          "postprocess", "seg_sr_write", "publish", "total", "end_to_end")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


@dataclass
class E2EResult:
    pipelines: dict[str, dict[str, Any]]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"pipelines": self.pipelines, "notes": self.notes}


def _bench_pipeline(loaded: LoadedPipeline, tmp: Path, pacs: tuple[str, int] | None
                    ) -> LoadedPipeline:
    """The reference file with absolute model paths and, when given, a PACS publisher."""
    data = yaml.safe_load(loaded.path.read_text())
    data["model"]["path"] = str(loaded.model_path)
    if loaded.card_path:
        data["model"]["card"] = str(loaded.card_path)
    if pacs is not None:
        data["publishers"] = [{"kind": "store"}, {"kind": "pacs", "ae_title": "ORTHANC",
                                                  "host": "127.0.0.1", "port": pacs[1],
                                                  "retries": 2}]
    path = tmp / f"{loaded.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_pipeline(path)


def _start_orthanc(root: Path) -> tuple[Any, int] | None:
    import shutil
    import subprocess
    import urllib.request

    from events.nats_server import free_port

    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc"
                                         if Path("/usr/sbin/Orthanc").exists() else None)
    if binary is None:
        return None
    dicom_port, http_port = free_port(), free_port()
    (root / "db").mkdir(parents=True)
    conf = root / "orthanc.json"
    conf.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True}))
    # DCMTK (inside Orthanc) leaves Nagle on unless TCP_NODELAY=1: ~0.1 s per C-STORE
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1).close()
            return proc, dicom_port
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    return None


def _dicom_path_available() -> bool:
    import importlib.util
    import shutil

    return shutil.which("storescu") is not None and importlib.util.find_spec("ingest.app") \
        is not None


async def _storescu(port: int, called: str, files: list[Path]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "storescu", "-aet", "BENCH_SCU", "-aec", called, "127.0.0.1", str(port),
        *map(str, files), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"})
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise EngineError(f"storescu failed: {out.decode(errors='replace')[-500:]}")


async def run_e2e_bench(studies: int = 10, names: tuple[str, ...] = ("hfd", "bts", "lts"),
                        via: str = "auto") -> E2EResult:
    """Per pipeline, ``studies`` phantom studies, one at a time, through a worker on a real
    nats-server (and a real Orthanc as the PACS when installed); per-stage p50/p90.

    ``via="dicom"``: sent by dcmtk's storescu to the ingest SCP on the pipeline's AE title
    (transfer and completion measured); ``via="feed"``: written to the store and their
    events published by the bench (from "study completed" on); ``auto``: dicom when dcmtk
    and the ingest package are there.
    """
    from demo import phantoms
    from engine.feed import feed_study
    from engine.worker import EngineWorker, WorkerConfig
    from events.jetstream import BusSettings
    from events.nats_server import EmbeddedNats, free_port

    use_dicom = via == "dicom" or (via == "auto" and _dicom_path_available())
    notes = [
        "total = study completed event -> inference completed event (results stored and "
        "published: the commit of a run); queue = study completed -> worker picked it up",
        "inference = model compute (sliding windows / 2D batches); platform overhead = "
        "total - inference",
    ]
    if use_dicom:
        notes.append("via dicom: storescu (TCP_NODELAY=1) -> ingest SCP on the pipeline's AE "
                     "title; transfer = send start -> last instance stored; completion = last "
                     "instance stored -> study completed (association released + grace)")
    else:
        notes.append("via feed: instances written to the store and their InstanceStored "
                     "events published by the bench itself; transfer and completion not "
                     "measured")
    generators = {
        "bts": lambda i: phantoms.brain_mr_study(9000 + i),
        "lts": lambda i: phantoms.abdomen_ct_study(9100 + i),
        "hfd": lambda i: phantoms.pelvis_study(9200 + i, images=5, size=1024),
    }
    results: dict[str, dict[str, Any]] = {}
    secret = b"bench-secret-0123456789abcdef01"
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-e2e-") as tmp_s:
        tmp = Path(tmp_s)
        orthanc = _start_orthanc(tmp / "orthanc")
        if orthanc is None:
            notes.append("Orthanc not installed: the publish stage covers the store only")
        else:
            notes.append("publish = store + C-STORE of SEG/SR to a real Orthanc on loopback "
                         "(Orthanc started with TCP_NODELAY=1)")
        server = EmbeddedNats(tmp / "nats", port=free_port(), sync="2m").start()
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            bus = await EventBus.connect(BusSettings(servers=(server.url,), stream="BENCH"))
            config = WorkerConfig(instances_dir=tmp / "instances", results_dir=tmp / "results",
                                  secret=secret, worker_id="bench", heartbeat_s=5.0)
            loaded = {n: _bench_pipeline(load_pipeline(REFERENCE_DIR / f"{n}.yaml"), tmp,
                                         (("ORTHANC", orthanc[1]) if orthanc else None))
                      for n in names}
            for lp in loaded.values():
                await bus.publish(deployed_event(lp, actor="bench", stage=Stage.VALIDATION))
            worker = EngineWorker(loaded, config)
            tasks.append(asyncio.create_task(worker.run(bus, stop)))
            if use_dicom:
                from ingest.app import IngestApp, IngestOptions
                from ingest.dicom_scp import ScpConfig
                from ingest.rules_file import RulesFile

                ingest = IngestApp(IngestOptions(instances_dir=config.instances_dir,
                                                 scp=ScpConfig(port=free_port()),
                                                 min_free_bytes=0),
                                   secret, RulesFile.open(None))
                tasks.append(asyncio.create_task(ingest.run(bus, stop)))
                await asyncio.wait_for(ingest.scp.started.wait(), 15)
                for _ in range(750):  # the detector must be following the log
                    if ingest.detector is not None and ingest.detector.ready.is_set():
                        break
                    await asyncio.sleep(0.02)
                port = ingest.scp.port
                assert port is not None

                async def send(name: str, study: Any, i: int) -> None:
                    files = await asyncio.to_thread(study.write, tmp / "send" / f"{name}{i}")
                    await _storescu(port, f"LM_{name.upper()}", files)
            else:
                async def send(name: str, study: Any, i: int) -> None:
                    await feed_study(bus, study.datasets, config.instances_dir, secret,
                                     pipeline=name, called_ae=f"LM_{name.upper()}")
            try:
                for name in names:
                    results[name] = await _bench_one(bus, worker, name, generators[name],
                                                     studies, send)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
                await bus.close()
        finally:
            server.stop()
            if orthanc is not None:
                orthanc[0].terminate()
                orthanc[0].wait(10)
    return E2EResult(results, notes)


async def _bench_one(bus: EventBus, worker: EngineWorker, name: str, make: Any, studies: int,
                     send: Any) -> dict[str, Any]:
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    overhead_share: list[float] = []
    inference: list[float] = []
    for i in range(studies + 1):  # study 0 warms up (model load, first calls): not counted
        study = await asyncio.to_thread(make, i)
        sent_at = datetime.now(UTC)
        await send(name, study, i)
        deadline = time.monotonic() + 120
        outcome: RunOutcome | None = None
        while time.monotonic() < deadline:
            outcome = next((o for o in worker.outcomes if o.study_uid == study.study_uid), None)
            if outcome is not None:
                break
            await asyncio.sleep(0.02)
        if outcome is None or outcome.status != "completed":
            types = [ev.type_name() for _, ev in await bus.history(study.study_uid)]
            raise EngineError(f"bench: {name} study {i} did not complete: {outcome}; "
                              f"its events: {types}")
        history = [ev for _, ev in await bus.history(study.study_uid)]
        done = next(e for e in history if isinstance(e, StudyCompleted))
        completed = next(e for e in history if isinstance(e, InferenceCompleted))
        last_stored = max(e.occurred_at for e in history if isinstance(e, InstanceStored))
        started = min(e.occurred_at for e in history if e.type_name() ==
                      "engine.inference.requested")
        if i == 0:
            continue
        stage = dict.fromkeys(STAGES, 0.0)
        stage["transfer"] = max(0.0, (last_stored - sent_at).total_seconds())
        stage["completion"] = max(0.0, (done.occurred_at - last_stored).total_seconds())
        stage["queue"] = (started - done.occurred_at).total_seconds()
        stage["load"] = outcome.stages.get("read", 0.0) + outcome.stages.get("model_load", 0.0)
        for ev in history:
            if isinstance(ev, OperatorFinished):
                stage[STAGE_OF_OPERATOR.get(ev.operator, "postprocess")] += ev.duration_s
        stage["seg_sr_write"] += outcome.stages.get("store", 0.0)
        stage["publish"] = outcome.stages.get("publish", 0.0)
        stage["total"] = (completed.occurred_at - done.occurred_at).total_seconds()
        stage["end_to_end"] = (completed.occurred_at - sent_at).total_seconds()
        for s in STAGES:
            per_stage[s].append(stage[s])
        inference.append(stage["inference"])
        overhead_share.append(1.0 - stage["inference"] / stage["total"])
    return {
        "studies": studies,
        "p50_s": {s: round(_pct(v, 50), 4) for s, v in per_stage.items()},
        "p90_s": {s: round(_pct(v, 90), 4) for s, v in per_stage.items()},
        "inference_p50_s": round(_pct(inference, 50), 4),
        "platform_overhead_p50_s": round(_pct([t - x for t, x in
                                               zip(per_stage["total"], inference,
                                                   strict=True)], 50), 4),
        "platform_overhead_share_p50": round(_pct(overhead_share, 50), 4),
    }
