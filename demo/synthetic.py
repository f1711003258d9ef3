"""A synthetic site: plausible event histories for the three reference pipelines.

Used by the benchmark, the dashboards' demo data and tests. Everything is
deterministic for a seed (event ids, times, values), so two runs give the same log
and a test can assert exact figures.

What a study looks like (per pipeline, after the paper):

- ``bts`` (brain tumour, MR, 3 series): patients come back (longitudinal volumes and
  progression), two readers read progression vs stable; some masks are edited and
  the volume is recomputed with a Dice against the AI mask; runtime ~2.9 min.
- ``lts`` (liver, CT, 2 series): lobe and vessel volumes; three masks per case (AI,
  expert, novice) are read blinded under salted labels (``unblinding`` maps them back).
- ``hfd`` (hip fracture, 5 radiographs): left/right hip normal/fracture/hardware with
  probabilities; a human QC gate, then three readers; runtime ~15 s.

Arrivals are spread over ``weeks``; from ``drift_week`` on, one site switches to a
new scanner model (so drift monitoring has something to find). Each study's events
are emitted together, in that study's time order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from events.base import Event, deterministic_id
from events.catalogue import (
    CaseAssigned,
    CompletionReason,
    DeliveryFailed,
    EditSubmitted,
    Finding,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    InferenceSkipped,
    InferenceStarted,
    InstanceDuplicated,
    InstanceRejected,
    InstanceStored,
    Measurement,
    MeasurementRecomputed,
    OperatorFinished,
    PipelineDeployed,
    PipelineStageChanged,
    PublishFailed,
    QcPassed,
    QcRejected,
    ResultPublished,
    ReviewSubmitted,
    RouteMatched,
    RouteUnmatched,
    SeriesCompleted,
    SeriesSummary,
    Stage,
    StudyCompleted,
)

PIPELINES = ("bts", "lts", "hfd")
AE = {"bts": "LM_BTS", "lts": "LM_LTS", "hfd": "LM_HFD"}


def runtime_target_s(pipeline: str) -> float | None:
    """The reference pipeline file's ``targets.runtime_s`` (seconds): the synthetic
    deployments carry what a real ``lastmile pipelines deploy`` of that file would."""
    from engine.spec import REFERENCE_DIR, load_pipeline

    return load_pipeline(REFERENCE_DIR / f"{pipeline}.yaml",
                         check_model=False).spec.targets.runtime_s
OPERATORS = {
    "bts": ("load", "register", "preprocess", "infer", "postprocess", "write_seg"),
    "lts": ("load", "preprocess", "infer", "postprocess", "write_seg"),
    "hfd": ("load", "detect", "classify", "write_sr"),
}
MEAN_RUNTIME_S = {"bts": 174.0, "lts": 360.0, "hfd": 15.0}
READERS = {
    "bts": ("neurorad_a", "neurorad_b"),
    "lts": ("abdrad_a", "abdrad_b"),
    "hfd": ("msk_a", "msk_b", "msk_c"),
}
SITES = (
    ("UCSF Parnassus", "MR_PARN", ("SIEMENS", "Skyra"), ("GE MEDICAL SYSTEMS", "Revolution")),
    ("UCSF Mission Bay", "MR_MB", ("GE MEDICAL SYSTEMS", "SIGNA Premier"),
     ("SIEMENS", "SOMATOM Force")),
    ("ZSFG", "ZSFG_PACS", ("PHILIPS", "Ingenia"), ("PHILIPS", "iCT 256")),
)
DRIFT_SCANNER = ("CANON", "Vantage Galan")
SEX = ("F", "M")
AGE_BANDS = ("20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90+")
HIP_CLASSES = ("normal", "fracture", "hardware")
LTS_SOURCES = ("ai", "expert", "novice")
BTS_SERIES = (("T1 POST GD", 1.0), ("T2 FLAIR", 0.9), ("T1 PRE", 1.0))
LTS_SERIES = (("ABD PORTAL VENOUS", 0.78), ("ABD ARTERIAL", 0.78))
SKIP_REASONS = ("no series matched the selection rules", "localizer only",
                "contrast phase missing")
FAIL_ERRORS = {"infer": "onnxruntime: out of memory", "load": "truncated pixel data",
               "write_seg": "highdicom: frame of reference missing",
               "register": "registration did not converge"}


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 7
    studies: int = 300
    start: datetime = datetime(2026, 6, 1, tzinfo=UTC)
    weeks: int = 12
    drift_week: int | None = 8  # from this week on, one site's MR scanner changes
    mix: tuple[float, float, float] = (0.4, 0.2, 0.4)  # bts, lts, hfd
    instances_per_series: int = 8


@dataclass
class SyntheticSite:
    """Generates the log of a site; ``unblinding`` collects blinded label -> source (LTS)."""

    config: SyntheticConfig = field(default_factory=SyntheticConfig)
    unblinding: dict[str, str] = field(default_factory=dict)
    truth: dict[tuple[str, str], str] = field(default_factory=dict)  # (run_key, label) -> class

    def __post_init__(self) -> None:
        self._rng = random.Random(self.config.seed)
        self._patients: dict[str, dict[str, Any]] = {}
        self._bts_patients: list[str] = []
        self._k = 0
        self._study_no = 0

    # ------------------------------------------------------------------ building blocks

    def _id(self, *parts: object) -> str:
        self._k += 1
        return deterministic_id("synthetic", self.config.seed, self._k, *parts)

    def _ev(self, cls: type[Event], t: datetime, *, actor: str, study: str | None,
            pipeline: str | None, cause: str | None = None, **payload: Any) -> Event:
        corr = deterministic_id("study", study) if study else self._id("corr")
        return cls(event_id=self._id(cls.type_name()), schema_version=cls.SCHEMA_VERSION,
                   occurred_at=t, recorded_at=t, correlation_id=corr, causation_id=cause,
                   actor=actor, study_uid=study, pipeline=pipeline, **payload)

    def _uid(self, *parts: object) -> str:
        h = hashlib.sha256("\x1f".join(str(p) for p in (self.config.seed, *parts)).encode())
        return "2.25." + str(int.from_bytes(h.digest()[:15], "big"))

    # ------------------------------------------------------------------ the log

    def events(self) -> Iterator[Event]:
        """Every event of the site: deployments first, then the studies in arrival order."""
        yield from self.deployments()
        cfg = self.config
        span = timedelta(weeks=cfg.weeks).total_seconds()
        arrivals = sorted(self._rng.random() * span for _ in range(cfg.studies))
        for offset in arrivals:
            yield from self.study(cfg.start + timedelta(seconds=offset))

    def deployments(self) -> Iterator[Event]:
        t = self.config.start - timedelta(days=14)
        for p in PIPELINES:
            yield self._ev(PipelineDeployed, t, actor="admin", study=None, pipeline=p, name=p,
                           version="1.0.0", file_sha256=hashlib.sha256(p.encode()).hexdigest(),
                           model_sha256=hashlib.sha256(b"model" + p.encode()).hexdigest(),
                           stage=Stage.STAGING, ae_title=AE[p], reason="initial deployment",
                           runtime_target_s=runtime_target_s(p))
            prev = Stage.STAGING
            for i, to in enumerate((Stage.SILENT, Stage.VALIDATION)):
                yield self._ev(PipelineStageChanged, t + timedelta(days=3 + 5 * i),
                               actor="governance", study=None, pipeline=p, name=p,
                               version="1.0.0", from_stage=prev, to_stage=to,
                               reason="board decision")
                prev = to

    def _patient(self, pipeline: str) -> tuple[str, dict[str, Any]]:
        rng = self._rng
        if pipeline == "bts" and self._bts_patients and rng.random() < 0.55:
            key = rng.choice(self._bts_patients)
            return key, self._patients[key]
        key = hashlib.sha256(f"{self.config.seed}/{len(self._patients)}".encode()).hexdigest()[:32]
        site = rng.randrange(len(SITES))
        info = {"sex": rng.choice(SEX), "age": rng.choice(AGE_BANDS), "site": site,
                "bts": pipeline == "bts", "volume": rng.uniform(2.0, 40.0)}
        self._patients[key] = info
        if pipeline == "bts":
            self._bts_patients.append(key)
        return key, info

    def study(self, t0: datetime) -> Iterator[Event]:
        rng, cfg = self._rng, self.config
        self._study_no += 1
        n = self._study_no
        pipeline = rng.choices(PIPELINES, weights=cfg.mix)[0]
        patient, info = self._patient(pipeline)
        study = self._uid("study", n)
        week = int((t0 - cfg.start).total_seconds() // (7 * 86400))
        institution, calling, mr, ct = SITES[info["site"]]
        scanner = mr if pipeline == "bts" else ct if pipeline == "lts" else ("FUJIFILM", "FDR")
        if cfg.drift_week is not None and week >= cfg.drift_week and info["site"] == 0 \
                and pipeline == "bts":
            scanner = DRIFT_SCANNER
        modality = {"bts": "MR", "lts": "CT", "hfd": "DX"}[pipeline]
        series_defs = {"bts": BTS_SERIES, "lts": LTS_SERIES,
                       "hfd": (("PELVIS AP", 0.15),)}[pipeline]
        per_series = cfg.instances_per_series if pipeline != "hfd" else 5
        called = AE[pipeline]
        t = t0
        out: list[Event] = []
        summaries = []
        total = 0
        for s_i, (desc, spacing) in enumerate(series_defs):
            series = self._uid("series", n, s_i)
            if scanner == DRIFT_SCANNER:
                spacing = spacing * 0.5
            for i in range(per_series):
                t += timedelta(seconds=rng.uniform(0.05, 0.4))
                sop = self._uid("sop", n, s_i, i)
                sha = hashlib.sha256(sop.encode()).hexdigest()
                if rng.random() < 0.004:
                    out.append(self._ev(InstanceRejected, t, actor=called, study=study,
                                        pipeline=None, reason="SOP class not accepted",
                                        status=0x0122, status_name="SOPClassNotSupported",
                                        calling_ae=calling, called_ae=called,
                                        sop_instance_uid=sop))
                    continue
                total += 1
                out.append(self._ev(
                    InstanceStored, t, actor=called, study=study, pipeline=None,
                    sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    series_uid=series, transfer_syntax_uid="1.2.840.10008.1.2.1", sha256=sha,
                    size_bytes=int(rng.uniform(0.4e6, 5e6)), store_key=f"{sha[:2]}/{sha}.dcm",
                    calling_ae=calling, called_ae=called, modality=modality,
                    series_number=s_i + 1, series_description=desc, instance_number=i + 1,
                    manufacturer=scanner[0], manufacturer_model=scanner[1],
                    institution=institution, patient_pseudonym=patient,
                    patient_sex=info["sex"], age_band=info["age"],
                    study_date=t0.strftime("%Y%m%d"), pixel_spacing_mm=spacing))
                if rng.random() < 0.01:
                    out.append(self._ev(InstanceDuplicated, t, actor=called, study=study,
                                        pipeline=None, sop_instance_uid=sop, sha256=sha,
                                        calling_ae=calling, called_ae=called))
            summaries.append(SeriesSummary(series_uid=series, modality=modality,
                                           series_description=desc,
                                           instance_count=per_series))
        first_at, last_at = t0, t
        if rng.random() < 0.01:
            out.append(self._ev(RouteUnmatched, t, actor="router", study=study, pipeline=None,
                                called_ae="LASTMILE", reason="no rule matched modality OT"))
            yield from out
            return
        out.append(self._ev(RouteMatched, t, actor="router", study=study, pipeline=pipeline,
                            rule_ids=(f"{pipeline}-ae",), pipelines=(pipeline,),
                            called_ae=called, reasons=(f"called AE {called}",)))
        reason = rng.choices(list(CompletionReason)[:5], weights=(50, 30, 15, 2, 3))[0]
        latency = {CompletionReason.QUIET_PERIOD: 30.0, CompletionReason.EXPECTED_SERIES: 0.5,
                   CompletionReason.ASSOCIATION_RELEASED: 1.0, CompletionReason.FORCED: 5.0,
                   CompletionReason.MAX_WAIT: 600.0}[reason]
        for summary in summaries:
            out.append(self._ev(SeriesCompleted, t, actor="ingest", study=study,
                                pipeline=pipeline, series_uid=summary.series_uid,
                                reason=reason, instance_count=summary.instance_count,
                                modality=modality,
                                series_description=summary.series_description))
        t += timedelta(seconds=latency)
        done = self._ev(StudyCompleted, t, actor="ingest", study=study, pipeline=pipeline,
                        reason=reason, series_count=len(summaries), instance_count=total,
                        latency_s=latency, first_instance_at=first_at.isoformat(),
                        last_instance_at=last_at.isoformat(), series=tuple(summaries),
                        patient_pseudonym=patient)
        out.append(done)
        out.extend(self._inference(done, t, pipeline, patient, info, study,
                                   t0.strftime("%Y%m%d")))
        yield from out

    def _inference(self, done: Event, t: datetime, p: str, patient: str,
                   info: dict[str, Any], study: str, study_date: str) -> Iterator[Event]:
        rng = self._rng
        run_key = f"{study}/{p}/1.0.0"
        model_sha = hashlib.sha256(b"model" + p.encode()).hexdigest()
        t += timedelta(seconds=rng.uniform(0.2, 2.0))
        req = self._ev(InferenceRequested, t, actor="scheduler", study=study, pipeline=p,
                       cause=done.event_id, run_key=run_key, model_sha256=model_sha,
                       stage=Stage.VALIDATION)
        yield req
        if rng.random() < 0.03:
            yield self._ev(InferenceSkipped, t + timedelta(seconds=1), actor="worker-1",
                           study=study, pipeline=p, run_key=run_key,
                           reason=rng.choice(SKIP_REASONS))
            return
        attempt = 1
        if rng.random() < 0.04:  # the first worker died: redelivered after ack wait
            yield self._ev(InferenceStarted, t + timedelta(seconds=1), actor="worker-2",
                           study=study, pipeline=p, run_key=run_key, worker_id="worker-2",
                           attempt=1, runtime="onnxruntime-cpu")
            t += timedelta(seconds=31)
            attempt = 2
        t += timedelta(seconds=rng.uniform(0.5, 3))
        yield self._ev(InferenceStarted, t, actor="worker-1", study=study, pipeline=p,
                       run_key=run_key, worker_id="worker-1", attempt=attempt,
                       runtime="onnxruntime-cpu")
        total = rng.lognormvariate(math.log(MEAN_RUNTIME_S[p]) - 0.045, 0.3)
        ops = OPERATORS[p]
        weights = [rng.uniform(0.5, 2.0) * (4 if o in ("infer", "detect") else 1) for o in ops]
        fail_at = None
        if rng.random() < 0.02:
            fail_at = rng.choice([o for o in ops if o in FAIL_ERRORS] or [ops[0]])
        inference_s = 0.0
        for i, (op, w) in enumerate(zip(ops, weights, strict=True)):
            d = total * w / sum(weights)
            t += timedelta(seconds=d)
            if op == fail_at:
                yield self._ev(InferenceFailed, t, actor="worker-1", study=study, pipeline=p,
                               run_key=run_key, operator=op,
                               error=FAIL_ERRORS.get(op, "error"), attempt=attempt, final=True)
                return
            if op in ("infer", "detect", "classify"):
                inference_s += d
            yield self._ev(OperatorFinished, t, actor="worker-1", study=study, pipeline=p,
                           run_key=run_key, operator=op, index=i, duration_s=round(d, 3))
        measurements, findings, score, progression = self._result(p, info, run_key)
        completed = self._ev(
            InferenceCompleted, t, actor="worker-1", study=study, pipeline=p,
            cause=req.event_id, run_key=run_key, model_name=f"{p}-demo",
            model_version="1.0.0", model_sha256=model_sha, runtime="onnxruntime-cpu",
            runtime_reason="no GPU", duration_s=round(total, 3),
            inference_s=round(inference_s, 3), measurements=measurements, findings=findings,
            score=score, progression=progression,
            result_keys=(f"results/{run_key}.dcm",),
            blinding_hash=None, patient_pseudonym=patient, study_date=study_date)
        yield completed
        kinds = ("SEG", "SR") if p != "hfd" else ("SR",)
        for kind in kinds:
            t += timedelta(seconds=rng.uniform(0.5, 4))
            attempt_pub = 1
            if rng.random() < 0.02:
                yield self._ev(PublishFailed, t, actor="publisher", study=study, pipeline=p,
                               run_key=run_key, destination="pacs:ORTHANC",
                               error="association rejected", attempt=1, will_retry=True)
                t += timedelta(seconds=10)
                attempt_pub = 2
            yield self._ev(ResultPublished, t, actor="publisher", study=study, pipeline=p,
                           run_key=run_key, destination="pacs:ORTHANC", kind=kind,
                           sop_instance_uid=self._uid("result", run_key, kind),
                           attempt=attempt_pub)
        if rng.random() < 0.002:
            yield self._ev(DeliveryFailed, t, actor="consumer:publisher", study=study,
                           pipeline=p, consumer="publisher", subject=f"lm.ev.x.{p}",
                           stream_sequence=rng.randrange(1, 10**6), deliveries=5,
                           reason="handler timed out 5 times",
                           original_type="engine.inference.completed")
        t += timedelta(hours=rng.uniform(0.2, 30))
        if p == "hfd":
            if rng.random() < 0.08:
                yield self._ev(QcRejected, t, actor="qc_tech", study=study, pipeline=p,
                               run_key=run_key, reason=rng.choice(("wrong body part",
                                                                   "boxes misplaced")),
                               seconds_on_case=rng.uniform(5, 40))
                return
            yield self._ev(QcPassed, t, actor="qc_tech", study=study, pipeline=p,
                           run_key=run_key, seconds_on_case=rng.uniform(3, 25))
        yield from self._reads(p, run_key, study, t, findings, measurements)

    def _result(self, p: str, info: dict[str, Any], run_key: str,
                ) -> tuple[tuple[Measurement, ...], tuple[Finding, ...], float | None,
                           bool | None]:
        rng = self._rng
        if p == "bts":
            prior = info["volume"]
            grows = rng.random() < 0.3
            vol = max(0.1, prior * (rng.uniform(1.15, 1.6) if grows else rng.uniform(0.8, 1.1)))
            info["volume"] = vol
            change = 100.0 * (vol - prior) / prior
            truth = "progression" if grows else "stable"
            self.truth[(run_key, "lesion")] = truth
            prob = min(0.99, max(0.01, rng.gauss(0.8 if grows else 0.25, 0.15)))
            cls = "progression" if prob >= 0.5 else "stable"
            return ((Measurement(name="lesion_volume", value=round(vol, 3), unit="mL",
                                 label="lesion"),
                     Measurement(name="lesion_volume_change", value=round(change, 2),
                                 unit="%", label="lesion")),
                    (Finding(label="lesion", classification=cls, probability=round(
                        prob if cls == "progression" else 1 - prob, 4)),),
                    round(prob, 4), cls == "progression")
        if p == "lts":
            left = rng.gauss(550, 90)
            right = rng.gauss(1000, 150)
            vessels = rng.gauss(60, 10)
            return ((Measurement(name="left_lobe_volume", value=round(left, 1), unit="mL",
                                 label="left_lobe"),
                     Measurement(name="right_lobe_volume", value=round(right, 1), unit="mL",
                                 label="right_lobe"),
                     Measurement(name="vessel_volume", value=round(vessels, 1), unit="mL",
                                 label="vessels")), (), None, None)
        findings = []
        top = 0.0
        for side in ("left_hip", "right_hip"):
            truth = rng.choices(HIP_CLASSES, weights=(0.72, 0.2, 0.08))[0]
            self.truth[(run_key, side)] = truth
            p_frac = min(0.99, max(0.01, rng.gauss(0.85 if truth == "fracture" else 0.12, 0.15)))
            if truth == "hardware" and rng.random() < 0.95:
                cls, prob = "hardware", rng.uniform(0.8, 0.99)
            else:
                cls = "fracture" if p_frac >= 0.5 else "normal"
                prob = p_frac if cls == "fracture" else 1 - p_frac
            top = max(top, p_frac)
            findings.append(Finding(label=side, classification=cls, probability=round(prob, 4),
                                    box=(10.0, 10.0, 200.0, 200.0)))
        return (), tuple(findings), round(top, 4), None

    def _reads(self, p: str, run_key: str, study: str, t: datetime,
               findings: tuple[Finding, ...], measurements: tuple[Measurement, ...],
               ) -> Iterator[Event]:
        rng = self._rng
        if p == "lts":
            for source in LTS_SOURCES:
                label = hashlib.sha256(f"salt/{run_key}/{source}".encode()).hexdigest()[:12]
                self.unblinding[label] = source
                quality = {"ai": 0.85, "expert": 0.9, "novice": 0.6}[source]
                for reader in READERS[p]:
                    t += timedelta(minutes=rng.uniform(1, 60))
                    yield self._ev(CaseAssigned, t, actor="worklist", study=study, pipeline=p,
                                   run_key=run_key, reader=reader, blinded_label=label)
                    t += timedelta(minutes=rng.uniform(5, 240))
                    ok = rng.random() < quality
                    yield self._ev(ReviewSubmitted, t, actor=reader, study=study, pipeline=p,
                                   run_key=run_key, reader=reader,
                                   reads={"mask": "acceptable" if ok else "unacceptable"},
                                   confidence=rng.randint(3, 5) if ok else rng.randint(1, 3),
                                   seconds_on_case=rng.uniform(60, 420), blinded_label=label)
            return
        sens, spec = {"bts": (0.9, 0.92), "hfd": (0.93, 0.96)}[p]
        for r_i, reader in enumerate(READERS[p]):
            t += timedelta(minutes=rng.uniform(1, 90))
            yield self._ev(CaseAssigned, t, actor="worklist", study=study, pipeline=p,
                           run_key=run_key, reader=reader)
            t += timedelta(minutes=rng.uniform(2, 600))
            reads: dict[str, str] = {}
            agree: dict[str, bool] = {}
            for f in findings:
                truth = self.truth[(run_key, f.label)]
                positive = "progression" if p == "bts" else "fracture"
                negative = "stable" if p == "bts" else "normal"
                if truth == "hardware":
                    read = "hardware" if rng.random() < 0.97 else "normal"
                elif truth == positive:
                    read = positive if rng.random() < sens - 0.02 * r_i else negative
                else:
                    read = negative if rng.random() < spec else positive
                reads[f.label] = read
                agree[f.label] = read == f.classification
            review = self._ev(ReviewSubmitted, t, actor=reader, study=study, pipeline=p,
                              run_key=run_key, reader=reader, agree=agree, reads=reads,
                              confidence=rng.randint(2, 5),
                              seconds_on_case=rng.lognormvariate(math.log(45 if p == "hfd"
                                                                          else 150), 0.5))
            yield review
            if p == "bts" and r_i == 0 and rng.random() < 0.3:
                t += timedelta(minutes=rng.uniform(1, 20))
                sha = hashlib.sha256(f"edit/{run_key}".encode()).hexdigest()
                edit = self._ev(EditSubmitted, t, actor=reader, study=study, pipeline=p,
                                run_key=run_key, reader=reader, store_key=f"{sha[:2]}/{sha}.dcm",
                                sha256=sha)
                yield edit
                ai_vol = next(m.value for m in measurements if m.name == "lesion_volume")
                new_vol = max(0.05, ai_vol * rng.gauss(1.03, 0.08))
                t += timedelta(seconds=rng.uniform(2, 20))
                yield self._ev(MeasurementRecomputed, t, actor="worker-1", study=study,
                               pipeline=p, cause=edit.event_id, run_key=run_key,
                               edit_event_id=edit.event_id,
                               measurements=(Measurement(name="lesion_volume",
                                                         value=round(new_vol, 3), unit="mL",
                                                         label="lesion"),),
                               dice={"lesion": round(min(1.0, max(0.0, rng.gauss(0.87, 0.06))),
                                                     4)})


def synthetic_events(config: SyntheticConfig | None = None) -> Iterator[Event]:
    """The events of a synthetic site (see ``SyntheticSite`` for the unblinding key)."""
    return SyntheticSite(config or SyntheticConfig()).events()


def site_for_count(target: int, seed: int = 7, weeks: int = 26) -> SyntheticSite:
    """A site with more than ``target`` events (studies average ~34)."""
    return SyntheticSite(SyntheticConfig(seed=seed, studies=max(1, target // 28 + 10),
                                         weeks=weeks))


def first_events(site: SyntheticSite, target: int) -> Iterator[Event]:
    """Exactly the first ``target`` events of ``site`` (fewer if it has fewer)."""
    for i, ev in enumerate(site.events()):
        if i >= target:
            return
        yield ev


def events_for_count(target: int, seed: int = 7, weeks: int = 26) -> Iterator[Event]:
    """``target`` synthetic events (the site's unblinding key: use ``site_for_count``)."""
    return first_events(site_for_count(target, seed, weeks), target)
