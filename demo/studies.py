"""The demo's studies: a deterministic plan of patients, time points and dates, the
phantom study for each entry with its ground truth, and the seeds every choice derives from
(same seed, same studies and events)."""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

PIPELINES = ("bts", "lts", "hfd")
AE = {"bts": "LM_BTS", "lts": "LM_LTS", "hfd": "LM_HFD"}
FIRST_DATE = date(2026, 1, 5)  # a Monday; study dates are spread over --weeks from here


PROGRESSION_PCT = 25.0  # the BTS pipeline's threshold_pct: the truth uses the same rule
GROWTH = (1.12, 0.78, 1.0)  # lesion radius factor per exam: progression, improved, stable


@dataclass(frozen=True)
class PlannedStudy:
    """One study to generate and send: which phantom, for whom, when."""

    pipeline: str
    patient: int  # index within the demo
    timepoint: int
    study_date: str  # YYYYMMDD
    phantom_seed: int
    lesion_radius_mm: float | None = None
    lesion_centre_mm: tuple[float, float, float] | None = None
    scanner_model: str | None = None  # ManufacturerModelName, when not the phantoms' own


def plan(patients: int, seed: int, weeks: int, timepoints: int = 3) -> list[list[PlannedStudy]]:
    """Rounds of studies. Round k holds every patient's k-th BTS exam (a patient's exams
    must be read in date order for the longitudinal comparison); round 0 also holds the
    LTS and HFD exams. Every third BTS patient's lesion grows >25% per exam (patients
    0, 3, ...: progression), the next one's shrinks by half per exam from a larger start
    (1, 4, ...: improved), the next one's stays (2, 5, ...: stable)."""
    span_days = max(1, weeks * 7 - 1)
    rounds: list[list[PlannedStudy]] = [[] for _ in range(timepoints)]
    for p in range(patients):
        rng = rng_for(seed, "patient", p)
        base_r = rng.uniform(8.0, 12.0)
        # radius x1.12 = volume x1.40 per exam; x0.78 = volume x0.47, from x1.35 so the
        # last exam's lesion (>= 6.6 mm) stays in the model's training range (6-22 mm)
        growth = GROWTH[p % len(GROWTH)]
        if growth < 1.0:
            base_r *= 1.35
        centre = (rng.uniform(-10, 10), rng.uniform(-20, 20), rng.uniform(-15, 15))
        for t in range(timepoints):
            day = round(t * span_days / max(1, timepoints - 1)) if timepoints > 1 else 0
            rounds[t].append(PlannedStudy(
                "bts", p, t, (FIRST_DATE + timedelta(days=day)).strftime("%Y%m%d"),
                seed_for(seed, "bts", p, t), round(base_r * growth ** t, 2), centre))
        for name in ("lts", "hfd"):
            day = rng.randrange(span_days + 1)
            rounds[0].append(PlannedStudy(name, p, 0,
                                          (FIRST_DATE + timedelta(days=day)).strftime("%Y%m%d"),
                                          seed_for(seed, name, p)))
    return rounds


DRIFT_STUDIES = 2  # BTS exams of new patients from a new scanner, sent last
DRIFT_SCANNER_MODEL = "synthetic 3T upgrade"


def drift_batch(patients: int, seed: int, weeks: int) -> list[PlannedStudy]:
    """The later batch: first BTS exams of ``DRIFT_STUDIES`` new patients (numbered after
    the plan's) from a new scanner model, dated on the plan's last day and sent after
    every other study, so the Drift page's window (the latest arrivals) holds the
    scanner change and its PSI of ``manufacturer_model`` crosses the threshold."""
    day = FIRST_DATE + timedelta(days=max(1, weeks * 7 - 1))
    out = []
    for i in range(DRIFT_STUDIES):
        p = patients + i
        rng = rng_for(seed, "patient", p)
        out.append(PlannedStudy("bts", p, 0, day.strftime("%Y%m%d"), seed_for(seed, "bts", p, 0),
                                round(rng.uniform(8.0, 12.0), 2),
                                (rng.uniform(-10, 10), rng.uniform(-20, 20),
                                 rng.uniform(-15, 15)), DRIFT_SCANNER_MODEL))
    return out


@dataclass
class Truth:
    """What the phantom was made from, per finding label (for the simulated readers)."""

    labels: dict[str, str] = field(default_factory=dict)
    volume_ml: float | None = None


def make_study(s: PlannedStudy, seed: int, hfd_images: int) -> tuple[Any, Truth]:
    """The phantom study (all of one demo patient's exams share a fake patient)."""
    from demo import phantoms

    patient = phantoms.fake_patient(seed_for(seed, "patient", s.patient))
    if s.pipeline == "bts":
        st = phantoms.brain_mr_study(s.phantom_seed, patient=patient, study_date=s.study_date,
                                     lesion_radius_mm=s.lesion_radius_mm,
                                     lesion_centre_mm=s.lesion_centre_mm)
        st.datasets += t1_post_series(st.datasets, s.phantom_seed)
        for ds in st.datasets if s.scanner_model else ():
            ds.ManufacturerModelName = s.scanner_model
        return st, Truth(volume_ml=st.truth_volumes_ml().get("lesion"))
    if s.pipeline == "lts":
        return phantoms.abdomen_ct_study(s.phantom_seed, patient=patient,
                                         study_date=s.study_date), Truth()
    st = phantoms.pelvis_study(s.phantom_seed, patient=patient, study_date=s.study_date,
                               images=hfd_images)
    return st, Truth(labels={f"{h.side}_hip": h.classification for h in st.hips[0]})


def t1_post_series(datasets: list[Any], phantom_seed: int) -> list[Any]:
    """A T1 post-contrast series for a BTS study. The site's routing rules expect one
    (the paper's BTS reads FLAIR + T1 post) before a BTS study counts as complete, and
    the phantom generator makes only the FLAIR (and a localizer). The demo derives it
    from the FLAIR slices (same geometry, contrast inverted, new deterministic UIDs);
    the pipeline selects the FLAIR, so this series only satisfies completion."""
    import numpy as np

    from demo.phantoms import uid_for

    flair = [ds for ds in datasets if "FLAIR" in str(ds.get("SeriesDescription", ""))]
    series_uid = uid_for("demo-t1", phantom_seed)
    out = []
    for ds in flair:
        t1 = copy.deepcopy(ds)
        t1.SeriesInstanceUID = series_uid
        t1.SOPInstanceUID = uid_for("demo-t1", phantom_seed, ds.SOPInstanceUID)
        t1.file_meta.MediaStorageSOPInstanceUID = t1.SOPInstanceUID
        t1.SeriesDescription = "AX T1 POST GAD"
        t1.SeriesNumber = 5
        pixels = ds.pixel_array.astype(np.int32)
        t1.PixelData = np.clip(1200 - pixels, 0, 4095).astype(np.uint16).tobytes()
        out.append(t1)
    return out


def rng_for(seed: int, *parts: object) -> random.Random:
    """An independent, reproducible random stream per (seed, what it decides)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def seed_for(seed: int, *parts: object) -> int:
    """A phantom seed (31 bits) per (demo seed, pipeline, patient, time point)."""
    digest = hashlib.sha256("/".join(map(str, ("phantom", seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
