"""The demo's simulated people: readers with their sensitivity, specificity and reading
time, the QC reviewer, blinded LTS readers, and the mask edits a clinician would make; each
choice is seeded, so the same seed gives the same events."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from demo.studies import PROGRESSION_PCT, Truth, rng_for
from events.base import Event, deterministic_id
from events.catalogue import (
    CaseAssigned,
    InferenceCompleted,
    QcPassed,
    QcRejected,
    ReviewSubmitted,
)


@dataclass(frozen=True)
class Reader:
    """A simulated reader: how often they call a positive positive (sensitivity) and a
    negative negative (specificity), how often they pick another class regardless
    (disagreement), and their typical seconds on a case (log-normal around it)."""

    name: str
    sensitivity: float = 0.92
    specificity: float = 0.95
    disagreement: float = 0.03
    seconds: float = 60.0


HFD_READERS = (Reader("msk_a", 0.93, 0.96, 0.02, 45.0), Reader("msk_b", 0.90, 0.95, 0.04, 60.0),
               Reader("msk_c", 0.85, 0.92, 0.06, 90.0))


BTS_READERS = (Reader("neurorad_a", 0.92, 0.94, 0.03, 150.0),
               Reader("neurorad_b", 0.88, 0.92, 0.05, 200.0))


LTS_READERS = (Reader("abdrad_a", seconds=240.0), Reader("abdrad_b", seconds=300.0),
               Reader("abdrad_c", seconds=180.0))


#: the blinded LTS study's mask sources and how often a reader rates each acceptable: the
#: reference readers' masks (drawn by an expert and by a novice: ``REFERENCE_MASKS``) are
#: rated blind beside the AI's
LTS_ACCEPT_BY_SOURCE = {"ai": 0.85, "expert": 0.95, "novice": 0.55}
QC_REJECT_RATE = 0.1
QC_REASONS = ("wrong body part", "boxes misplaced", "image quality")
LTS_ACCEPT = 0.85  # chance a reader rates the AI liver mask acceptable
EDIT_KINDS = ("erode", "dilate", "trim")


def simulate_read(reader: Reader, truth: str, *, positive: str, negative: str,
                  classes: Sequence[str], rng: random.Random) -> str:
    """One reader's class for one finding, given the truth. Classes other than
    positive/negative (e.g. hardware) are recognised unless the reader disagrees."""
    if truth == positive:
        read = positive if rng.random() < reader.sensitivity else negative
    elif truth == negative:
        read = negative if rng.random() < reader.specificity else positive
    else:
        read = truth
    if rng.random() < reader.disagreement:
        read = rng.choice([c for c in classes if c != read])
    return read


def review_seconds(reader: Reader, rng: random.Random) -> float:
    return round(rng.lognormvariate(0.0, 0.4) * reader.seconds, 1)


@dataclass(frozen=True)
class PlannedEdit:
    """A simulated reader's correction of one AI mask."""

    reader: str
    kind: str  # one of EDIT_KINDS
    label: str | None  # the segment corrected; None: a non-empty one, chosen by seed
    source: str = "lastmile"  # EditSubmitted.source: a clinician's correction, or the
    # blinded study's "expert" / "novice" reference mask


#: the reference masks of every LTS exam for the blinded study: an expert's (a slice
#: trimmed: close to the AI's) and a novice's (dilated: over-segmented), each drawn from
#: the AI mask by the demo and registered as ``lastmile review add-mask`` does
REFERENCE_MASKS = (PlannedEdit("liver_expert", "trim", None, "expert"),
                   PlannedEdit("liver_novice", "dilate", None, "novice"))


def edit_for(seed: int, pipeline: str, study_uid: str, patient: int, timepoint: int
             ) -> PlannedEdit | None:
    """Which AI masks a reader corrects: every patient's second BTS exam (the first
    neuroradiologist) and every other patient's LTS exam (the first abdominal radiologist);
    the kind of correction comes from the seed."""
    if pipeline == "bts" and timepoint == 1:
        reader = BTS_READERS[0].name
    elif pipeline == "lts" and patient % 2 == 0:
        reader = LTS_READERS[0].name
    else:
        return None
    rng = rng_for(seed, study_uid, "edit")
    return PlannedEdit(reader, rng.choice(EDIT_KINDS), None)


def simulate_edit(masks: dict[str, Any], edit: PlannedEdit, rng: random.Random
                  ) -> dict[str, Any]:
    """The corrected masks: one label (``edit.label``, else one of the non-empty ones,
    chosen by ``rng``) eroded or dilated by one pixel in each slice, or its first or last
    one or two slices removed. Masks are ``(slices, rows, columns)`` bool arrays; the
    others are returned unchanged."""
    import numpy as np
    from scipy import ndimage

    label = edit.label or rng.choice(sorted(k for k in masks if np.any(masks[k]))
                                     or sorted(masks))
    mask = np.asarray(masks[label], bool)
    if edit.kind == "erode":
        new = np.stack([ndimage.binary_erosion(s) for s in mask])
    elif edit.kind == "dilate":
        new = np.stack([ndimage.binary_dilation(s) for s in mask])
    elif edit.kind == "trim":
        new = mask.copy()
        rows = np.flatnonzero(mask.any(axis=(1, 2)))
        n = min(len(rows), rng.choice((1, 2)))
        new[rows[:n] if rng.random() < 0.5 else rows[len(rows) - n:]] = False
    else:
        raise ValueError(f"unknown edit kind {edit.kind!r} (one of {EDIT_KINDS})")
    return {**masks, label: new}


def people_events(seed: int, pipeline: str, outcome: InferenceCompleted, truth: Truth,
                  prior_volume_ml: float | None, baseline_volume_ml: float | None = None,
                  blinded_labels: dict[str, str] | None = None) -> list[Event]:
    """The simulated people's events for one completed run (pure; deterministic ids).
    BTS follow-ups: the readers read progression / stable / improved against the truth
    the engine's rule gives on the phantom's volumes (``prior_volume_ml``, and
    ``baseline_volume_ml``: the patient's first exam, default the prior). LTS: with
    ``blinded_labels`` (source -> the blinded study's label of this exam's mask), each
    blinded reader rates every source's mask under its label; without, the AI's mask
    under the run's blinding hash."""
    study, run_key = outcome.study_uid or "", outcome.run_key
    evs: list[Event] = []

    def eid(*parts: object) -> str:
        return deterministic_id("demo", seed, study, *parts)

    if pipeline == "hfd":
        rng = rng_for(seed, study, "qc")
        if rng.random() < QC_REJECT_RATE:
            evs.append(QcRejected.new(actor="qc_demo", study_uid=study, pipeline=pipeline,
                                      event_id=eid("qc_demo", "qc"), run_key=run_key,
                                      reason=rng.choice(QC_REASONS),
                                      seconds_on_case=round(rng.uniform(5, 40), 1)))
            return evs
        evs.append(QcPassed.new(actor="qc_demo", study_uid=study, pipeline=pipeline,
                                event_id=eid("qc_demo", "qc"), run_key=run_key,
                                seconds_on_case=round(rng.uniform(3, 25), 1)))
        ai: dict[str, str] = {}
        for f in sorted(outcome.findings, key=lambda f: -(f.probability or 0.0)):
            ai.setdefault(f.label, f.classification)
        for reader in HFD_READERS:
            rng = rng_for(seed, study, reader.name)
            reads = {label: simulate_read(reader, truth.labels.get(label, "normal"),
                                          positive="fracture", negative="normal",
                                          classes=("normal", "fracture", "hardware"), rng=rng)
                     for label in sorted(ai)}
            evs += _assigned_and_review(eid, reader, study, pipeline, run_key, reads, ai, rng)
        return evs
    if pipeline == "bts":
        if outcome.progression is None or prior_volume_ml is None or truth.volume_ml is None:
            return evs  # a first exam: nothing to compare, nothing to read
        from engine.ops.longitudinal import CLASSES, EarlierResult, compare

        # the truth by the engine's own rule, on the phantom's true volumes
        earlier = [EarlierResult("baseline", "20000101", baseline_volume_ml or prior_volume_ml),
                   EarlierResult("prior", "20000102", prior_volume_ml)]
        true_class = compare(truth.volume_ml, "20000103", earlier,
                             threshold_pct=PROGRESSION_PCT).finding or "stable"
        ai = {"lesion": next((f.classification for f in outcome.findings
                              if f.classification in CLASSES),
                             "progression" if outcome.progression else "stable")}
        for reader in BTS_READERS:
            rng = rng_for(seed, study, reader.name)
            reads = {"lesion": simulate_read(reader, true_class, positive="progression",
                                             negative="stable", classes=CLASSES, rng=rng)}
            evs += _assigned_and_review(eid, reader, study, pipeline, run_key, reads, ai, rng)
        return evs
    # lts: three readers rate each mask under its blinded label
    if blinded_labels is None:
        labels = {"ai": outcome.blinding_hash
                  or hashlib.sha256(f"demo/{run_key}".encode()).hexdigest()[:12]}
    else:
        labels = dict(blinded_labels)
    for reader in LTS_READERS:
        rng = rng_for(seed, study, reader.name)
        evs.append(CaseAssigned.new(actor="worklist", study_uid=study, pipeline=pipeline,
                                    event_id=eid(reader.name, "assigned"), run_key=run_key,
                                    reader=reader.name, blinded_label=labels.get("ai")))
        for source, label in sorted(labels.items(), key=lambda kv: kv[1]):
            ok = rng.random() < LTS_ACCEPT_BY_SOURCE.get(source, LTS_ACCEPT)
            evs.append(ReviewSubmitted.new(
                actor=reader.name, study_uid=study, pipeline=pipeline,
                event_id=eid(reader.name, "review", *(() if source == "ai" else (source,))),
                run_key=run_key, reader=reader.name,
                reads={"mask": "acceptable" if ok else "unacceptable"},
                confidence=rng.randint(3, 5) if ok else rng.randint(1, 3),
                seconds_on_case=review_seconds(reader, rng), blinded_label=label))
    return evs


DEMO_VIEWER = "demo.viewer"  # dashboards.front.DEMO_USER: who opens the pages in demo mode


def waits_at_qc(pipeline: str, patient: int, patients: int) -> bool:
    """The last patient's HFD exam is left at the QC gate (no decision, no reads), so the
    QC gate page has a case after the demo (with two or more patients)."""
    return pipeline == "hfd" and patients > 1 and patient == patients - 1


def open_cases(seed: int, pipeline: str, outcome: InferenceCompleted, patient: int,
               timepoint: int, done: Sequence[Event]) -> list[Event]:
    """Cases assigned to the demo viewer and left unread, so the Worklist page has cases
    after the demo: every HFD exam that passed QC (``done`` holds its QC decision) and
    the first patient's BTS follow-up exams; every LTS exam, to rate on the Blinded reading
    page. Deterministic ids, like every demo event."""
    study, run_key = outcome.study_uid or "", outcome.run_key
    if pipeline == "hfd" and any(isinstance(ev, QcPassed) for ev in done) or \
            pipeline == "bts" and patient == 0 and timepoint > 0 or pipeline == "lts":
        return [CaseAssigned.new(actor="worklist", study_uid=study, pipeline=pipeline,
                                 event_id=deterministic_id("demo", seed, study, DEMO_VIEWER,
                                                           "assigned"),
                                 run_key=run_key, reader=DEMO_VIEWER)]
    return []


def _assigned_and_review(eid: Any, reader: Reader, study: str, pipeline: str, run_key: str,
                         reads: dict[str, str], ai: dict[str, str],
                         rng: random.Random) -> list[Event]:
    return [
        CaseAssigned.new(actor="worklist", study_uid=study, pipeline=pipeline,
                         event_id=eid(reader.name, "assigned"), run_key=run_key,
                         reader=reader.name),
        ReviewSubmitted.new(actor=reader.name, study_uid=study, pipeline=pipeline,
                            event_id=eid(reader.name, "review"), run_key=run_key,
                            reader=reader.name, reads=reads,
                            agree={k: v == ai.get(k) for k, v in reads.items()},
                            confidence=rng.randint(2, 5),
                            seconds_on_case=review_seconds(reader, rng)),
    ]
