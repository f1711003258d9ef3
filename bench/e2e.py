"""`lastmile bench e2e`: per pipeline, study completed -> result published, with the
per-stage p50/p90 and the platform's overhead; an Orthanc PACS is the peer that receives
the results when its binary is installed.

Rows: the reference pipelines (``hfd``, ``bts``, ``lts``), BTS on the ``torch`` runtime
(``bts-torch``: the reference model exported to TorchScript) and a two-model cascade
(``bts-cascade``: a locating program crops the image for BTS). For 3D segmentations the
run's time splits three ways: model compute (inside the runtime's ``run``), MONAI's
inferer overhead (the inferer operators' time less the model's: windowing, padding,
Gaussian blending, the conversion to probabilities) and platform overhead (the rest). The
peer is MONAI's own inferer on the same array with the same model loaded by hand."""

from __future__ import annotations

import asyncio
import json
import os
import re
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


#: rows besides the reference pipelines (they need torch, the ``train`` extra)
TORCH_ROWS = ("bts-torch", "bts-cascade")
#: the phantom each row runs on (the BTS variants on BTS's phantoms)
PHANTOM = {"hfd": "hfd", "bts": "bts", "lts": "lts", "bts-torch": "bts", "bts-cascade": "bts"}


def _bench_pipeline(loaded: LoadedPipeline, tmp: Path, pacs: tuple[str, int] | None,
                    model: Path | None = None, **top: Any) -> LoadedPipeline:
    """The file with absolute model paths and, when given, a PACS publisher; ``model``
    replaces the model (its hash recomputed, no card), ``top`` the file's top-level keys."""
    data = yaml.safe_load(loaded.path.read_text())
    data["model"]["path"] = str(loaded.model_path)
    if loaded.card_path:
        data["model"]["card"] = str(loaded.card_path)
    if model is not None:
        import hashlib

        data["model"]["path"] = str(model)
        data["model"]["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
        data["model"].pop("card", None)
    data.update(top)
    if pacs is not None:
        data["publishers"] = [{"kind": "store"}, {"kind": "pacs", "ae_title": "ORTHANC",
                                                  "host": "127.0.0.1", "port": pacs[1],
                                                  "retries": 2}]
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_pipeline(path)


def _row_pipeline(name: str, tmp: Path, pacs: tuple[str, int] | None) -> LoadedPipeline:
    """The pipeline of row ``name``: a reference file, or one of ``TORCH_ROWS`` built from
    BTS's (TorchScript export: ``demo.training.torchscript``; the cascade:
    ``demo.training.cascade``)."""
    if name == "bts-torch":
        from demo.training.torchscript import export_reference

        program, _ = export_reference("bts", tmp / "models")
        return _bench_pipeline(load_pipeline(REFERENCE_DIR / "bts.yaml"), tmp, pacs, program,
                               name=name, ae_title="LM_BTS_TORCH", runtime="torch")
    if name == "bts-cascade":
        from demo.training.cascade import cascade_pipeline

        path, _ = cascade_pipeline(tmp / "cascade", name=name, ae_title="LM_BTS_CASCADE")
        return _bench_pipeline(load_pipeline(path), tmp, pacs)
    return _bench_pipeline(load_pipeline(REFERENCE_DIR / f"{name}.yaml"), tmp, pacs)


def _torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


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


ALL_ROWS = ("hfd", "bts", "lts", *TORCH_ROWS)


async def run_e2e_bench(studies: int = 10, names: tuple[str, ...] = ALL_ROWS,
                        via: str = "auto", peer: bool = True) -> E2EResult:
    """Per pipeline, ``studies`` phantom studies, one at a time, through a worker on a real
    nats-server (and a real Orthanc as the PACS when installed); per-stage p50/p90.

    ``via="dicom"``: sent by dcmtk's storescu to the ingest SCP on the pipeline's AE title
    (transfer and completion measured); ``via="feed"``: written to the store and their
    events published by the bench (from "study completed" on); ``auto``: dicom when dcmtk
    and the ingest package are there. ``peer``: for 3D segmentations, MONAI's own inferer
    on the same array with the same model (``monai_peer`` in the row). Rows of
    ``TORCH_ROWS`` are left out, with a note, when torch is not installed; an unknown
    name raises ``EngineError``.
    """
    from demo import phantoms
    from engine.feed import feed_study
    from engine.worker import EngineWorker, WorkerConfig
    from events.jetstream import BusSettings
    from events.nats_server import EmbeddedNats, free_port

    unknown = [n for n in names if n not in PHANTOM]
    if unknown:
        raise EngineError(f"bench e2e: unknown pipeline rows {unknown} (known: {ALL_ROWS})")
    use_dicom = via == "dicom" or (via == "auto" and _dicom_path_available())
    notes = [
        "total = study completed event -> inference completed event (results stored and "
        "published: the commit of a run); queue = study completed -> worker picked it up",
        "inference = the inferer operators (MONAI inferers / 2D batches); platform overhead "
        "= total - inference",
        "3D split: model compute = inside the runtime's run calls; MONAI inferer overhead = "
        "inference - model compute (windowing, padding, blending, to probabilities); "
        "platform = everything else (read, selection, transforms, Invert, postprocess, "
        "SEG/SR, publish, events)",
    ]
    if not _torch_importable() and any(n in TORCH_ROWS for n in names):
        notes.append(f"torch not installed (train extra): rows {TORCH_ROWS} left out")
        names = tuple(n for n in names if n not in TORCH_ROWS)
    if peer:
        notes.append("monai_peer = MONAI's own inferer(s) with the pipeline file's parameters "
                     "on the array the platform's inferer got (captured from one study), "
                     "the same model loaded by hand (onnxruntime CPU / torch.jit), repeated "
                     "per study; no softmax")
    notes.append(f"machine: {os.cpu_count()} cores, 1-min load {os.getloadavg()[0]:.1f} at "
                 "start")
    if use_dicom:
        notes.append("via dicom: storescu (TCP_NODELAY=1) -> ingest SCP on the pipeline's AE "
                     "title; transfer = send start -> last instance stored; completion = last "
                     "instance stored -> study completed (association released + grace)")
    else:
        notes.append("via feed: instances written to the store and their InstanceStored "
                     "events published by the bench itself; transfer and completion not "
                     "measured")
    phantom_of = {
        "bts": lambda i: phantoms.brain_mr_study(9000 + i),
        "lts": lambda i: phantoms.abdomen_ct_study(9100 + i),
        "hfd": lambda i: phantoms.pelvis_study(9200 + i, images=5, size=1024),
    }
    # each row its own studies (phantoms with other seeds): a study UID runs one row
    generators = {n: (lambda i, make=phantom_of[p], k=k: make(i + 1000 * k))
                  for k, (n, p) in enumerate(PHANTOM.items())}
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
            loaded = {n: _row_pipeline(n, tmp, (("ORTHANC", orthanc[1]) if orthanc else None))
                      for n in names}
            ae_of = {n: lp.spec.ae_title for n, lp in loaded.items()}
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
                    await _storescu(port, ae_of[name], files)
            else:
                async def send(name: str, study: Any, i: int) -> None:
                    await feed_study(bus, study.datasets, config.instances_dir, secret,
                                     pipeline=name, called_ae=ae_of[name])
            try:
                for name in names:
                    results[name] = await _bench_one(bus, worker, name, generators[name],
                                                     studies, send)
                    if peer and loaded[name].spec.task == "segmentation3d":
                        results[name]["monai_peer"] = await asyncio.to_thread(
                            monai_peer, loaded[name], generators[name](1), studies)
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
    split: dict[str, list[float]] = {s: [] for s in SPLIT}
    seg3d = worker.pipelines[name].spec.task == "segmentation3d"
    for i in range(studies + 1):  # study 0 warms up (model load, first calls): not counted
        study = await asyncio.to_thread(make, i)
        sent_at = datetime.now(UTC)
        await send(name, study, i)
        deadline = time.monotonic() + 120
        outcome: RunOutcome | None = None
        while time.monotonic() < deadline:
            outcome = next((o for o in worker.outcomes if o.study_uid == study.study_uid
                            and o.pipeline == name), None)
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
        model_s = 0.0
        for ev in history:
            if isinstance(ev, OperatorFinished):
                stage[STAGE_OF_OPERATOR.get(ev.operator, "postprocess")] += ev.duration_s
                model_s += _model_seconds(ev)
        stage["seg_sr_write"] += outcome.stages.get("store", 0.0)
        stage["publish"] = outcome.stages.get("publish", 0.0)
        stage["total"] = (completed.occurred_at - done.occurred_at).total_seconds()
        stage["end_to_end"] = (completed.occurred_at - sent_at).total_seconds()
        for s in STAGES:
            per_stage[s].append(stage[s])
        inference.append(stage["inference"])
        overhead_share.append(1.0 - stage["inference"] / stage["total"])
        if seg3d:
            split["model_compute"].append(model_s)
            split["monai_inferer_overhead"].append(stage["inference"] - model_s)
            split["platform_overhead"].append(stage["total"] - stage["inference"])
    return {
        "studies": studies,
        "runtime": completed.runtime,
        "split_s": {k: {"p50": round(_pct(v, 50), 4), "p90": round(_pct(v, 90), 4)}
                    for k, v in split.items()} if seg3d else None,
        "p50_s": {s: round(_pct(v, 50), 4) for s, v in per_stage.items()},
        "p90_s": {s: round(_pct(v, 90), 4) for s, v in per_stage.items()},
        "inference_p50_s": round(_pct(inference, 50), 4),
        "platform_overhead_p50_s": round(_pct([t - x for t, x in
                                               zip(per_stage["total"], inference,
                                                   strict=True)], 50), 4),
        "platform_overhead_share_p50": round(_pct(overhead_share, 50), 4),
    }


#: a 3D segmentation's time, three ways (see the module's docstring)
SPLIT = ("model_compute", "monai_inferer_overhead", "platform_overhead")
#: the inferer operator's detail line ends "model 0.123 s of 0.456 s" (engine.steps)
_MODEL_S = re.compile(r"model (\d+(?:\.\d+)?) s of ")


def _model_seconds(ev: OperatorFinished) -> float:
    """Seconds inside the runtime's ``run`` calls of one inferer operator (0 for others)."""
    if ev.operator not in _INFERER_OPS:
        return 0.0
    m = _MODEL_S.search(ev.detail or "")
    if m is None:
        raise EngineError(f"bench: inferer {ev.operator} reported no model time")
    return float(m.group(1))


_INFERER_OPS = frozenset(n for n, s in STAGE_OF_OPERATOR.items()
                         if s == "inference" and n != "batch_2d")


def monai_peer(loaded: LoadedPipeline, study: Any, repeats: int) -> dict[str, Any]:
    """What a user gets on their own: MONAI's inferer(s) built from the pipeline file's
    parameters, run on the arrays the platform's inferers got for ``study`` (captured by
    running its steps in-process once) with the same model files loaded by hand
    (onnxruntime CPU session or ``torch.jit.load`` on CPU). ``repeats`` timed rounds after
    one warm-up; seconds p50/p90 of the inferers' time, the model's time inside them, and
    the difference (MONAI's overhead)."""
    import monai.inferers
    import torch

    from engine.dicom_results import Provenance
    from engine.ops.transforms import INFERERS
    from engine.runtimes import load_runtime, model_format, probe_host, select_runtime
    from engine.steps import RunContext, StepTiming, run_steps

    spec, host = loaded.spec, probe_host()

    def runtime(path: Path, sha: str) -> Any:
        return load_runtime(select_runtime(spec.runtime, host, model_format(path)), path, sha)

    ctx = RunContext(pipeline=loaded, runtime=runtime(loaded.model_path, spec.model.sha256),
                     runtimes={n: runtime(loaded.model_paths[n], m.sha256)
                               for n, m in spec.models.items()},
                     datasets=study.datasets,
                     provenance=Provenance(spec.model.name, spec.model.version,
                                           spec.model.sha256, spec.name, spec.version, "peer"))
    ops = spec.operators
    captured: list[tuple[str, dict[str, Any], str | None, Any]] = []

    def capture(t: StepTiming) -> None:
        nxt = t.index + 1
        if nxt < len(ops) and ops[nxt].op in INFERERS and ctx.image is not None:
            p: Any = loaded.operator_params[nxt]
            captured.append((ops[nxt].op, dict(p.kwargs), p.extra.get("model"),
                             ctx.image.as_tensor().detach().clone()))

    run_steps(ctx, on_step=capture)
    spent = [0.0]

    def by_hand(key: str | None) -> Any:
        m = spec.model if key is None else spec.models[key]
        path = loaded.model_path if key is None else loaded.model_paths[key]
        if model_format(path) == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            names = [o.name for o in session.get_outputs()]
            index = names.index(m.output.name) if m.output.name in names else 0

            def call(x: Any) -> Any:
                return torch.from_numpy(session.run(None, {feed: x.numpy()})[index])
        else:
            net = torch.jit.load(str(path), map_location="cpu").eval()

            def call(x: Any) -> Any:
                out = net(x)
                return out[m.output.name or next(iter(out))] if isinstance(out, dict) else out

        def network(x: Any) -> Any:
            t0 = time.perf_counter()
            y = call(x)
            spent[0] += time.perf_counter() - t0
            return y
        return network

    plan = [(getattr(monai.inferers, op)(**kwargs), by_hand(key), image)
            for op, kwargs, key, image in captured]
    totals: list[float] = []
    models: list[float] = []
    for i in range(repeats + 1):
        spent[0] = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for inferer, network, image in plan:
                inferer(image[None], network)
        if i:  # the first round warms up
            totals.append(time.perf_counter() - t0)
            models.append(spent[0])
    over = [t - m for t, m in zip(totals, models, strict=True)]
    return {"inferers": [op for op, *_ in captured],
            "shapes": [list(image.shape[1:]) for *_, image in captured],
            "repeats": repeats,
            **{k: {"p50": round(_pct(v, 50), 4), "p90": round(_pct(v, 90), 4)}
               for k, v in (("inferer", totals), ("model_compute", models),
                            ("monai_inferer_overhead", over))}}
