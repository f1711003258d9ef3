"""Study completion as a pure fold over the log that weighs its evidence.

``CompletionTracker`` folds ``ingest.*`` events (instances stored and re-sent, routes,
associations opened / released / aborted, completions and amendments) into per (study,
pipeline) tracks; ``due(now)`` says which tracks are complete now, why, and on what
evidence, as ready-to-publish ``StudyCompleted`` / ``StudyAmended`` events. Nothing here
touches the network or a file: the service (``ingest.jetstream.CompletionDetector``) is
one durable consumer of the log that feeds events in and publishes what comes out, so
any number of receiver processes can feed it, and a restart rebuilds the same state by
folding the log again.

The evidence, strongest first (``CompletionPolicy`` holds the durations):

1. the counts the objects declare (NumberOfStudyRelatedInstances,
   NumberOfSeriesRelatedInstances, ImagesInAcquisition) are all present -> complete
   after ``release_grace_s`` (``declared_counts``);
2. an association released normally after carrying every instance of the study (at least
   ``release_min_instances``), every series' slices contiguous end to end ->
   ``release_grace_s`` after the release (``whole_study_released``);
3. the manifest (``expected_series``) satisfied and quiet for ``manifest_quiet_s``;
4. quiet for ``quiet_period_s``.

Quiet and waits are measured on a ``Clock`` (the service's persisted up-time), never in
wall time across a restart. Nothing completes (except at ``max_wait_s``) while the
manifest misses a series, a declared instance is missing, or an association that carried
the study is still open or was aborted by the sender or the network and no association
has since been released for the study (a resend); a ``max_wait`` completion in any of
those states is marked ``partial``.

Exactly once, across restarts: a completion's event id is derived from (study,
pipeline), an amendment's from (study, pipeline, instances so far), so a re-decision after
a crash is dropped by JetStream's de-duplication, and beyond its window by the fold,
which has already seen the recorded fact. Instances after a completion are coalesced
into amendments by the same evidence (``amend_quiet_s`` for the quiet period).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from events.base import Event, deterministic_id
from events.catalogue import (
    AssociationAborted,
    AssociationReleased,
    CompletionReason,
    InstanceDuplicated,
    InstanceStored,
    RouteMatched,
    SeriesSummary,
    StudyAmended,
    StudyCompleted,
)
from ingest.dataset import series_tag_values
from ingest.evidence import series_geometry
from ingest.rules import CompletionPolicy, RuleSet, manifest_status
from ingest.uptime import Clock, WallClock

ACTOR = "completion"
UNROUTED_KEEP_S = 3600.0
#: aborts that say nothing about missing data: our own idle timeout after the sender
#: stopped sending (PS3.8 ARTIM / network timeout)
NEUTRAL_ABORTS = frozenset({"acceptor"})
#: how many series an evidence list describes one by one
MAX_SERIES_EVIDENCE = 8

#: (stored key of the earlier version, of the new one) -> whether the pixel data differ
PixelsChanged = Callable[[str, str], bool]


def completion_id(study_uid: str, pipeline: str) -> str:
    """One completion per (study, pipeline), ever."""
    return deterministic_id("study-completed", study_uid, pipeline)


def _any_change(_old: str, _new: str) -> bool:
    return True


@dataclass
class _Series:
    series_uid: str
    modality: str | None = None
    description: str | None = None
    number: int | None = None
    manufacturer: str | None = None
    model: str | None = None
    station: str | None = None
    institution: str | None = None
    sops: set[str] = field(default_factory=set)
    positions: dict[str, float] = field(default_factory=dict)  # sop -> mm along normal
    declared: int | None = None  # the largest per-series count any instance declares

    def tags(self) -> dict[str, tuple[str, ...]]:
        return dict(series_tag_values(self.modality, self.description, self.number,
                                      self.series_uid, self.manufacturer, self.model,
                                      self.station, self.institution))


@dataclass
class _Association:
    """One association as far as one study is concerned."""

    association_id: str
    sops: set[str] = field(default_factory=set)
    released: int | None = None  # instances of the study its release said it carried
    aborted_by: str | None = None
    closed_at: datetime | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def unresolved_abort(self) -> bool:
        return self.aborted_by is not None and self.aborted_by not in NEUTRAL_ABORTS


@dataclass
class Track:
    """One study as one pipeline sees it."""

    study_uid: str
    pipeline: str
    first_at: datetime
    last_at: datetime
    last_event_id: str
    activity_at: datetime  # last instance stored or re-sent
    keys: list[tuple[str, str, str, datetime]] = field(default_factory=list)  # log order
    seen: set[tuple[str, str]] = field(default_factory=set)
    store_keys: dict[tuple[str, str], str] = field(default_factory=dict)
    series: dict[str, _Series] = field(default_factory=dict)
    declared_study: int | None = None
    patient_pseudonym: str | None = None
    completed: bool = False
    covered: int = 0  # keys the completion (and amendments) accounted for
    applied: set[str] = field(default_factory=set)  # completion/amendment event ids folded

    def add(self, ev: InstanceStored) -> None:
        key = (ev.sop_instance_uid, ev.sha256)
        if key in self.seen:
            return
        self.seen.add(key)
        self.store_keys[key] = ev.store_key
        at = ev.occurred_at
        self.keys.append((ev.sop_instance_uid, ev.sha256, ev.series_uid, at))
        self.first_at = min(self.first_at, at)
        self.activity_at = max(self.activity_at, at)
        if at >= self.last_at:
            self.last_at, self.last_event_id = at, ev.event_id
        s = self.series.get(ev.series_uid)
        if s is None:
            s = self.series[ev.series_uid] = _Series(ev.series_uid)
        s.sops.add(ev.sop_instance_uid)
        s.modality = s.modality or ev.modality
        s.description = s.description or ev.series_description
        s.number = s.number if s.number is not None else ev.series_number
        s.manufacturer = s.manufacturer or ev.manufacturer
        s.model = s.model or ev.manufacturer_model
        s.station = s.station or ev.station_name
        s.institution = s.institution or ev.institution
        if ev.slice_position_mm is not None:
            s.positions[ev.sop_instance_uid] = ev.slice_position_mm
        declared = max((n for n in (ev.declared_series_instances, ev.images_in_acquisition)
                        if n is not None), default=None)
        if declared is not None:
            s.declared = max(s.declared or 0, declared)
        if ev.declared_study_instances is not None:
            self.declared_study = max(self.declared_study or 0, ev.declared_study_instances)
        self.patient_pseudonym = self.patient_pseudonym or ev.patient_pseudonym

    @property
    def sops(self) -> set[str]:
        return {sop for sop, _sha, _series, _at in self.keys}

    @property
    def late(self) -> list[tuple[str, str, str, datetime]]:
        return self.keys[self.covered:] if self.completed else []


@dataclass(frozen=True)
class Verdict:
    """Why a track is complete now, and on what evidence."""

    reason: CompletionReason
    partial: bool
    evidence: tuple[str, ...]


class CompletionTracker:
    """The fold. Not thread-safe: one task feeds it (the detector service or the CLI)."""

    def __init__(self, rules: RuleSet, clock: Clock | None = None,
                 pixels_changed: PixelsChanged = _any_change) -> None:
        self.rules = rules
        self.clock: Clock = clock or WallClock()
        self.pixels_changed = pixels_changed
        self.tracks: dict[tuple[str, str], Track] = {}
        self._study_pipelines: dict[str, set[str]] = {}
        self._series_routes: dict[tuple[str, str], set[str]] = {}
        self._unrouted: OrderedDict[tuple[str, str], list[InstanceStored]] = OrderedDict()
        # study -> association id -> what it carried of the study and how it ended
        self._associations: dict[str, dict[str, _Association]] = {}
        # tracks that may have something due (pending, or completed with late instances)
        self._active: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ folding

    def observe(self, event: Event) -> None:
        """Fold one event. Idempotent: redelivered events change nothing."""
        match event:
            case InstanceStored():
                self._stored(event)
            case InstanceDuplicated() if event.study_uid:
                self._carried(event.study_uid, event.association_id, event.sop_instance_uid)
                for p in self._study_pipelines.get(event.study_uid, ()):
                    resent = self.tracks[(event.study_uid, p)]
                    if (event.sop_instance_uid, event.sha256) in resent.seen:
                        resent.activity_at = max(resent.activity_at, event.occurred_at)
            case AssociationReleased() | AssociationAborted() if event.study_uid:
                a = self._association(event.study_uid, event.association_id)
                if a.closed_at is None:
                    a.closed_at = event.occurred_at
                    if isinstance(event, AssociationReleased):
                        a.released = event.instance_count
                    else:
                        a.aborted_by = event.aborted_by
                for p in self._study_pipelines.get(event.study_uid, ()):
                    self._active.add((event.study_uid, p))
            case RouteMatched(series_uid=series_uid) if event.study_uid and series_uid:
                key = (event.study_uid, series_uid)
                self._series_routes.setdefault(key, set()).update(event.pipelines)
                for waiting in self._unrouted.pop(key, []):
                    self._stored(waiting)
            case StudyCompleted(pipeline=pipeline) if event.study_uid and pipeline:
                self._completed(event, event.study_uid, pipeline)
            case StudyAmended(pipeline=pipeline) if event.study_uid and pipeline:
                amended = self.tracks.get((event.study_uid, pipeline))
                if amended is not None and event.event_id not in amended.applied:
                    amended.applied.add(event.event_id)
                    amended.covered = min(len(amended.keys),
                                          amended.covered + event.new_instance_count)
            case _:
                pass

    def observe_all(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.observe(ev)

    def _association(self, study_uid: str, association_id: str) -> _Association:
        per_study = self._associations.setdefault(study_uid, {})
        a = per_study.get(association_id)
        if a is None:
            a = per_study[association_id] = _Association(association_id)
        return a

    def _carried(self, study_uid: str, association_id: str | None, sop: str) -> None:
        if association_id:
            self._association(study_uid, association_id).sops.add(sop)

    def _stored(self, ev: InstanceStored) -> None:
        if not ev.study_uid:
            return
        self._carried(ev.study_uid, ev.association_id, ev.sop_instance_uid)
        if ev.pipeline:
            pipelines = {ev.pipeline}
        else:
            pipelines = self._series_routes.get((ev.study_uid, ev.series_uid), set())
            if not pipelines:
                self._unrouted.setdefault((ev.study_uid, ev.series_uid), []).append(ev)
                return
        for p in sorted(pipelines):
            self._stored_for(ev, p)

    def _stored_for(self, ev: InstanceStored, pipeline: str) -> None:
        assert ev.study_uid
        track = self.tracks.get((ev.study_uid, pipeline))
        if track is None:
            track = self.tracks[(ev.study_uid, pipeline)] = Track(
                ev.study_uid, pipeline, ev.occurred_at, ev.occurred_at, ev.event_id,
                ev.occurred_at)
            self._study_pipelines.setdefault(ev.study_uid, set()).add(pipeline)
        track.add(ev)
        self._active.add((ev.study_uid, pipeline))

    def _completed(self, ev: StudyCompleted, study_uid: str, pipeline: str) -> None:
        track = self.tracks.get((study_uid, pipeline))
        if track is None:  # forced for a pipeline that had no routed instance
            track = self.tracks[(study_uid, pipeline)] = Track(
                study_uid, pipeline, ev.occurred_at, ev.occurred_at, ev.event_id,
                ev.occurred_at)
            self._study_pipelines.setdefault(study_uid, set()).add(pipeline)
        if ev.event_id in track.applied or track.completed:
            track.applied.add(ev.event_id)
            return
        track.applied.add(ev.event_id)
        track.completed = True
        # instances folded beyond what the completion counted arrived after its decision
        track.covered = min(len(track.keys), ev.instance_count)

    # ------------------------------------------------------------------ weighing

    def _declared(self, track: Track) -> tuple[bool | None, list[str]]:
        """(all declared counts present? None when nothing is declared, evidence)."""
        lines: list[str] = []
        ok: bool | None = None
        if track.declared_study is not None:
            n = len(track.sops)
            met = n >= track.declared_study
            ok = met
            lines.append(f"NumberOfStudyRelatedInstances (0020,1208) declares "
                         f"{track.declared_study}, {n} present")
        for s in track.series.values():
            if s.declared is not None:
                met = len(s.sops) >= s.declared
                ok = met if ok is None else ok and met
                lines.append(f"series {s.series_uid}: {s.declared} declared "
                             f"(NumberOfSeriesRelatedInstances / ImagesInAcquisition), "
                             f"{len(s.sops)} present")
        return ok, lines

    def weigh(self, track: Track, now: datetime, since: datetime,
              quiet_s: float) -> Verdict | None:
        """The verdict for ``track`` at ``now`` (None: keep waiting). ``since`` is when
        this round began (first instance, or first late one) for the maximum wait."""
        policy = self.rules.policy(track.pipeline)
        up = self.clock.at
        now_up = up(now)
        age = now_up - up(since)
        quiet = now_up - up(track.activity_at)
        sops = track.sops
        evidence: list[str] = []
        satisfied, missing = manifest_status(policy, [s.tags() for s in track.series.values()])
        if policy.expected_series:
            evidence.append("manifest: " + (f"missing {', '.join(missing)}" if missing
                                            else "every expected series present"))
        declared_ok, declared_lines = self._declared(track)
        evidence.extend(declared_lines)
        geometry = {uid: series_geometry(list(s.positions.values()))
                    for uid, s in sorted(track.series.items())}
        gaps = [uid for uid, g in geometry.items() if g.contiguous is False]
        evidence.extend(g.describe(uid) for uid, g in
                        list(geometry.items())[:MAX_SERIES_EVIDENCE])

        assocs = [a for a in self._associations.get(track.study_uid, {}).values()
                  if a.sops & sops]
        released = [a for a in assocs if a.released is not None and a.closed_at is not None]
        whole = [a for a in released if a.sops >= sops and len(a.sops) >= (a.released or 0)
                 and len(sops) >= policy.release_min_instances]
        last_release = max((a.closed_at for a in released if a.closed_at), default=None)
        unresolved: list[str] = []
        if not whole:
            for a in assocs:
                if a.open:
                    unresolved.append(f"association {a.association_id[:8]} carried "
                                      f"{len(a.sops & sops)} instances and never closed")
                elif a.unresolved_abort and not (
                        last_release is not None and a.closed_at is not None
                        and last_release > a.closed_at):
                    unresolved.append(f"association {a.association_id[:8]} was aborted by "
                                      f"the {a.aborted_by} after {len(a.sops & sops)} "
                                      f"instances and nothing was re-sent")
        if assocs:
            aborted = sum(1 for a in assocs if a.aborted_by is not None)
            evidence.append(f"{len(assocs)} association(s) carried the study: "
                            f"{len(released)} released, {aborted} aborted, "
                            f"{sum(1 for a in assocs if a.open)} open")
        evidence.extend(unresolved)
        evidence.append(f"{len(sops)} instances in {len(track.series)} series; quiet for "
                        f"{quiet:.1f} s of up-time")

        if age >= policy.max_wait_s:
            why = [*unresolved]
            if declared_ok is False:
                why.append("declared instances missing")
            if not satisfied:
                why.append("manifest incomplete")
            return Verdict(CompletionReason.MAX_WAIT, bool(why),
                           (f"waited the maximum {policy.max_wait_s:g} s of up-time", *evidence))
        if not satisfied or unresolved or declared_ok is False:
            return None
        if declared_ok and quiet >= policy.release_grace_s:
            return Verdict(CompletionReason.DECLARED_COUNTS, False,
                           ("every declared instance is present", *evidence))
        if whole and not gaps:
            a = max(whole, key=lambda w: w.closed_at or since)
            assert a.closed_at is not None
            after = now_up - up(max(a.closed_at, track.activity_at))
            if after >= policy.release_grace_s:
                return Verdict(CompletionReason.WHOLE_STUDY_RELEASED, False, (
                    f"association {a.association_id[:8]} released normally after carrying "
                    f"all {len(sops)} instances", *evidence))
        if policy.expected_series and quiet >= policy.manifest_quiet_s:
            return Verdict(CompletionReason.EXPECTED_SERIES, False, tuple(evidence))
        if quiet >= quiet_s:
            return Verdict(CompletionReason.QUIET_PERIOD, False, (
                f"quiet period of {quiet_s:g} s of up-time passed", *evidence))
        return None

    def decide(self, track: Track, now: datetime) -> CompletionReason | None:
        """The reason this track is complete at ``now``, or None to keep waiting."""
        verdict = self.weigh(track, now, track.first_at,
                             self.rules.policy(track.pipeline).quiet_period_s)
        return verdict.reason if verdict else None

    # ------------------------------------------------------------------ deciding

    def due(self, now: datetime) -> list[Event]:
        """Completions and amendments that are due at ``now`` (not yet folded back in)."""
        out: list[Event] = []
        for key in list(self._active):
            track = self.tracks[key]
            if not track.completed:
                if not track.keys:
                    continue
                policy = self.rules.policy(track.pipeline)
                verdict = self.weigh(track, now, track.first_at, policy.quiet_period_s)
                if verdict is not None:
                    out.append(self.completion(track, verdict.reason, now, verdict))
                continue
            late = track.late
            if not late:
                self._active.discard(key)
                continue
            policy = self.rules.policy(track.pipeline)
            verdict = self.weigh(track, now, min(at for *_, at in late),
                                 policy.amendment_quiet_s)
            if verdict is not None:
                out.append(self.amendment(track, policy, verdict))
        self._forget_unrouted(now)
        return out

    def completion(self, track: Track, reason: CompletionReason, now: datetime,
                   verdict: Verdict | None = None) -> StudyCompleted:
        series = tuple(
            SeriesSummary(series_uid=s.series_uid, modality=s.modality,
                          series_description=s.description, instance_count=len(s.sops))
            for s in sorted(track.series.values(), key=lambda s: (s.number or 0, s.series_uid))
        )
        return StudyCompleted.new(
            actor=ACTOR,
            study_uid=track.study_uid,
            pipeline=track.pipeline,
            event_id=completion_id(track.study_uid, track.pipeline),
            causation_id=track.last_event_id,
            reason=reason,
            series_count=len(series),
            instance_count=len(track.keys),
            latency_s=round(max(0.0, (now - track.last_at).total_seconds()), 3),
            first_instance_at=track.first_at.isoformat() if track.keys else None,
            last_instance_at=track.last_at.isoformat() if track.keys else None,
            series=series,
            patient_pseudonym=track.patient_pseudonym,
            partial=verdict.partial if verdict else False,
            evidence=verdict.evidence if verdict else (),
        )

    def amendment(self, track: Track, policy: CompletionPolicy,
                  verdict: Verdict | None = None) -> StudyAmended:
        late = track.late
        covered: dict[str, str] = {}
        for sop, sha, _series, _at in track.keys[: track.covered]:
            covered[sop] = sha
        new = changed = 0
        for sop, sha, _series, _at in late:
            earlier = covered.get(sop)
            if earlier is None:
                new += 1
            elif earlier != sha and self.pixels_changed(track.store_keys[(sop, earlier)],
                                                        track.store_keys[(sop, sha)]):
                changed += 1
            covered[sop] = sha
        stale = changed > 0 and policy.on_changed_pixels == "stale"
        rerun = (policy.rerun_on_amend and new > 0) or (
            changed > 0 and policy.on_changed_pixels == "rerun")
        total = len(track.keys)
        evidence = verdict.evidence if verdict else ()
        if changed:
            evidence = (f"{changed} stored instance(s) re-sent with other pixel data", *evidence)
        return StudyAmended.new(
            actor=ACTOR,
            study_uid=track.study_uid,
            pipeline=track.pipeline,
            event_id=deterministic_id("study-amended", track.study_uid, track.pipeline, total),
            new_instance_count=len(late),
            series_uids=tuple(sorted({series for _sop, _sha, series, _at in late})),
            rerun=rerun,
            pixels_changed=changed,
            stale=stale,
            reason=verdict.reason if verdict else None,
            instance_count=len(covered),
            partial=verdict.partial if verdict else False,
            evidence=evidence,
        )

    def force(
        self,
        study_uid: str,
        pipeline: str | None,
        now: datetime,
        stored: Iterable[InstanceStored] = (),
    ) -> list[StudyCompleted]:
        """``lastmile study complete``: complete now, for one pipeline or all of the study's.

        A pipeline that had no routed instance gets a track of the study's ``stored``
        instances (so a study routed nowhere can still be sent to a pipeline by hand).
        """
        if pipeline is not None and (study_uid, pipeline) not in self.tracks:
            for ev in stored:
                if ev.study_uid == study_uid:
                    self._stored_for(ev, pipeline)
        out = []
        for (study, p), track in self.tracks.items():
            if study != study_uid or track.completed or (pipeline and p != pipeline):
                continue
            if track.keys:
                out.append(self.completion(track, CompletionReason.FORCED, now, Verdict(
                    CompletionReason.FORCED, False, ("completed by hand",))))
        return out

    def _forget_unrouted(self, now: datetime) -> None:
        horizon = now - timedelta(seconds=UNROUTED_KEEP_S)
        while self._unrouted:
            key, waiting = next(iter(self._unrouted.items()))
            if waiting and waiting[-1].occurred_at >= horizon:
                break
            self._unrouted.popitem(last=False)

    def pending(self) -> int:
        return sum(1 for t in self.tracks.values() if not t.completed)
