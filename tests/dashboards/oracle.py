"""Expected figures computed straight from the known event list (no DuckDB, no
projections code), so the browser tests compare the pages with an independent oracle."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from events.base import Event
from events.catalogue import (
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    InferenceSkipped,
    InstanceStored,
    ReviewSubmitted,
    RouteMatched,
)


def exams(events: Iterable[Event], source_ae: str | None = None,
          version: str | None = None) -> dict[str, int]:
    """Studies with a stored instance, per pipeline they were routed to."""
    evs = list(events)
    stored: dict[str, str] = {}
    for e in evs:
        if isinstance(e, InstanceStored) and e.study_uid and e.study_uid not in stored:
            stored[e.study_uid] = e.calling_ae
    routed: dict[str, set[str]] = defaultdict(set)
    for e in evs:
        if isinstance(e, RouteMatched) and e.study_uid:
            routed[e.study_uid].update(e.pipelines)
    with_version = {e.study_uid for e in evs if isinstance(e, InferenceCompleted)
                    and e.model_version == version} if version else None
    out: Counter[str] = Counter()
    for study, ae in stored.items():
        if source_ae is not None and ae != source_ae:
            continue
        if with_version is not None and study not in with_version:
            continue
        for p in routed.get(study, ()):
            out[p] += 1
    return dict(out)


def outcomes(events: Iterable[Event]) -> dict[str, tuple[int, int, int]]:
    """Per pipeline: (finished runs, completed, final failures)."""
    runs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for e in events:
        if isinstance(e, InferenceRequested):
            runs[e.pipeline or ""]["req"].add(e.run_key)
        elif isinstance(e, InferenceCompleted):
            runs[e.pipeline or ""]["ok"].add(e.run_key)
        elif isinstance(e, InferenceFailed) and e.final:
            runs[e.pipeline or ""]["bad"].add(e.run_key)
        elif isinstance(e, InferenceSkipped):
            runs[e.pipeline or ""]["skip"].add(e.run_key)
    out = {}
    for p, r in runs.items():
        ok = r["ok"]
        bad = r["bad"] - ok
        skip = r["skip"] - ok - bad
        out[p] = (len(ok) + len(bad) + len(skip), len(ok), len(bad))
    return out


def sensitivity(events: Iterable[Event], pipeline: str, positive: str) -> tuple[float, int]:
    """AI sensitivity against the strict-majority reference of the readers' latest reads,
    over the current result of each study (its latest completed run: a re-run supersedes)."""
    events = list(events)
    current = {(e.study_uid, e.pipeline): e.run_key for e in events
               if isinstance(e, InferenceCompleted)}
    ai: dict[tuple[str, str], str] = {}
    reads: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for e in events:
        if e.pipeline != pipeline:
            continue
        if isinstance(e, InferenceCompleted):
            if current[(e.study_uid, e.pipeline)] != e.run_key:
                continue
            for f in e.findings:
                ai[(e.run_key, f.label)] = f.classification
        elif isinstance(e, ReviewSubmitted) and e.blinded_label is None:
            for label in set(e.reads) | set(e.agree):
                read = e.reads.get(label)
                if read is None and e.agree.get(label):
                    read = ai.get((e.run_key, label))
                if read is not None:
                    reads[(e.run_key, label)][e.reader] = read
    tp = fn = 0
    for case, cls in ai.items():
        r = reads.get(case, {})
        if len(r) < 2:
            continue
        top, n = Counter(r.values()).most_common(1)[0]
        if n * 2 <= len(r) or top != positive:
            continue
        if cls == positive:
            tp += 1
        else:
            fn += 1
    return tp / (tp + fn), tp + fn


def study_event_counts(events: Iterable[Event]) -> Counter[str]:
    return Counter(e.study_uid for e in events if e.study_uid)


def blinded_acceptance(events: Iterable[Event], unblinding: dict[str, str]) -> dict[str, float]:
    """Share of blinded mask reads rated acceptable, per unblinded source."""
    rated: dict[str, list[bool]] = defaultdict(list)
    for e in events:
        if isinstance(e, ReviewSubmitted) and e.blinded_label is not None and "mask" in e.reads:
            rated[unblinding.get(e.blinded_label, "(unknown key)")].append(
                e.reads["mask"] == "acceptable")
    return {k: sum(v) / len(v) for k, v in rated.items()}
