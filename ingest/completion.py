"""Study completion as a pure fold over the log, plus a clock.

``CompletionTracker`` folds ``ingest.*`` events (instance stored, route matched, study
completed, study amended) into per (study, pipeline) tracks, and ``due(now)`` says which
tracks are complete now and why, as ready-to-publish ``StudyCompleted`` /
``StudyAmended`` events. Nothing here touches the network: the service
(``ingest.jetstream_detector``) feeds events in and publishes what comes out, and a
restart rebuilds the same state by folding the log again.

Exactly once, across restarts: a completion's event id is derived from (study,
pipeline), an amendment's from (study, pipeline, instances so far), so a re-decision
after a crash is dropped by JetStream's de-duplication, and beyond its window by the
fold, which has already seen the recorded fact. A completion records how many
instances it covered; anything after those in log order is "late" and becomes an
amendment, never lost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from events.base import Event, deterministic_id
from events.catalogue import (
    CompletionReason,
    InstanceStored,
    RouteMatched,
    SeriesSummary,
    StudyAmended,
    StudyCompleted,
)
from ingest.dataset import series_tag_values
from ingest.rules import CompletionPolicy, RuleSet, manifest_status

ACTOR = "completion"
UNROUTED_KEEP_S = 3600.0


def completion_id(study_uid: str, pipeline: str) -> str:
    """One completion per (study, pipeline), ever."""
    return deterministic_id("study-completed", study_uid, pipeline)


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
    instances: int = 0

    def tags(self) -> dict[str, tuple[str, ...]]:
        return dict(series_tag_values(self.modality, self.description, self.number,
                                      self.series_uid, self.manufacturer, self.model,
                                      self.station, self.institution))


@dataclass
class Track:
    """One study as one pipeline sees it."""

    study_uid: str
    pipeline: str
    first_at: datetime
    last_at: datetime
    last_event_id: str
    keys: list[tuple[str, str, str, datetime]] = field(default_factory=list)  # log order
    seen: set[tuple[str, str]] = field(default_factory=set)
    series: dict[str, _Series] = field(default_factory=dict)
    per_association: dict[str, int] = field(default_factory=dict)
    patient_pseudonym: str | None = None
    completed: bool = False
    covered: int = 0  # instances the completion (and amendments) accounted for
    late: list[tuple[str, datetime]] = field(default_factory=list)  # (series, at)
    applied: set[str] = field(default_factory=set)  # completion/amendment event ids folded

    def add(self, ev: InstanceStored) -> None:
        key = (ev.sop_instance_uid, ev.sha256)
        if key in self.seen:
            return
        self.seen.add(key)
        at = ev.occurred_at
        self.keys.append((ev.sop_instance_uid, ev.sha256, ev.series_uid, at))
        self.first_at = min(self.first_at, at)
        if at >= self.last_at:
            self.last_at, self.last_event_id = at, ev.event_id
        s = self.series.get(ev.series_uid)
        if s is None:
            s = self.series[ev.series_uid] = _Series(ev.series_uid)
        s.instances += 1
        s.modality = s.modality or ev.modality
        s.description = s.description or ev.series_description
        s.number = s.number if s.number is not None else ev.series_number
        s.manufacturer = s.manufacturer or ev.manufacturer
        s.model = s.model or ev.manufacturer_model
        s.station = s.station or ev.station_name
        s.institution = s.institution or ev.institution
        if ev.association_id:
            self.per_association[ev.association_id] = (
                self.per_association.get(ev.association_id, 0) + 1)
        self.patient_pseudonym = self.patient_pseudonym or ev.patient_pseudonym
        if self.completed:
            self.late.append((ev.series_uid, at))


@dataclass(frozen=True)
class Release:
    """An association was released after storing ``stored`` instances (a hint)."""

    association_id: str
    stored: int
    at: datetime


class CompletionTracker:
    """The fold. Not thread-safe: one task feeds it (the detector service or the CLI)."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self.tracks: dict[tuple[str, str], Track] = {}
        self._series_routes: dict[tuple[str, str], set[str]] = {}
        self._unrouted: OrderedDict[tuple[str, str], list[InstanceStored]] = OrderedDict()
        self._releases: OrderedDict[str, Release] = OrderedDict()
        # every instance event folded per association (any study, routed or not): a
        # release hint counts all of them
        self._assoc_seen: OrderedDict[str, set[str]] = OrderedDict()
        # tracks that may have something due (pending, or completed with late instances)
        self._active: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ folding

    def observe(self, event: Event) -> None:
        """Fold one event. Idempotent: redelivered events change nothing."""
        match event:
            case InstanceStored():
                self._stored(event)
            case RouteMatched(series_uid=series_uid) if event.study_uid and series_uid:
                key = (event.study_uid, series_uid)
                self._series_routes.setdefault(key, set()).update(event.pipelines)
                for waiting in self._unrouted.pop(key, []):
                    self._stored(waiting)
            case StudyCompleted(pipeline=pipeline) if event.study_uid and pipeline:
                self._completed(event, event.study_uid, pipeline)
            case StudyAmended(pipeline=pipeline) if event.study_uid and pipeline:
                track = self.tracks.get((event.study_uid, pipeline))
                if track is not None and event.event_id not in track.applied:
                    track.applied.add(event.event_id)
                    track.covered += event.new_instance_count
                    del track.late[: event.new_instance_count]
            case _:
                pass

    def observe_all(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.observe(ev)

    def _stored(self, ev: InstanceStored) -> None:
        if not ev.study_uid:
            return
        if ev.association_id:
            seen = self._assoc_seen.get(ev.association_id)
            if seen is None:
                seen = self._assoc_seen[ev.association_id] = set()
                while len(self._assoc_seen) > 10_000:
                    self._assoc_seen.popitem(last=False)
            seen.add(ev.event_id)
        if ev.pipeline:
            pipelines = {ev.pipeline}
        else:
            pipelines = self._series_routes.get((ev.study_uid, ev.series_uid), set())
            if not pipelines:
                self._unrouted.setdefault((ev.study_uid, ev.series_uid), []).append(ev)
                return
        for p in sorted(pipelines):
            self._stored_for(ev, p)

    def _completed(self, ev: StudyCompleted, study_uid: str, pipeline: str) -> None:
        track = self.tracks.get((study_uid, pipeline))
        if track is None:  # forced for a pipeline that had no routed instance
            track = self.tracks[(study_uid, pipeline)] = Track(
                study_uid, pipeline, ev.occurred_at, ev.occurred_at, ev.event_id)
        if ev.event_id in track.applied or track.completed:
            track.applied.add(ev.event_id)
            return
        track.applied.add(ev.event_id)
        track.completed = True
        track.covered = ev.instance_count
        # instances folded beyond what the completion counted arrived after its decision
        track.late.extend((series, at) for _sop, _sha, series, at in
                          track.keys[ev.instance_count:])
        # what the completion summarised is no longer needed: keep only ``seen`` (to
        # recognise a redelivered instance) so memory stays small for finished studies
        track.keys.clear()
        track.series.clear()
        track.per_association.clear()

    def release(self, hint: Release) -> None:
        self._releases[hint.association_id] = hint
        while len(self._releases) > 10_000:
            self._releases.popitem(last=False)

    # ------------------------------------------------------------------ deciding

    def _released(self, track: Track) -> datetime | None:
        """When every association that sent this track's instances was released and all
        its instances were folded; None otherwise (or when instances had no association)."""
        if not track.per_association or sum(track.per_association.values()) < len(track.keys):
            return None
        latest: datetime | None = None
        for assoc in track.per_association:
            hint = self._releases.get(assoc)
            if hint is None or len(self._assoc_seen.get(assoc, ())) < hint.stored:
                return None
            latest = hint.at if latest is None else max(latest, hint.at)
        return latest

    def decide(self, track: Track, now: datetime) -> CompletionReason | None:
        """The reason this track is complete at ``now``, or None to keep waiting."""
        policy = self.rules.policy(track.pipeline)
        quiet = (now - track.last_at).total_seconds()
        if (now - track.first_at).total_seconds() >= policy.max_wait_s:
            return CompletionReason.MAX_WAIT
        satisfied, _ = manifest_status(policy, [s.tags() for s in track.series.values()])
        if not satisfied:
            return None
        released_at = self._released(track)
        if released_at is not None:
            since = (now - max(released_at, track.last_at)).total_seconds()
            if since >= policy.release_grace_s:
                return CompletionReason.ASSOCIATION_RELEASED
        if policy.expected_series and quiet >= policy.manifest_quiet_s:
            return CompletionReason.EXPECTED_SERIES
        if quiet >= policy.quiet_period_s:
            return CompletionReason.QUIET_PERIOD
        return None

    def due(self, now: datetime) -> list[Event]:
        """Completions and amendments that are due at ``now`` (not yet folded back in)."""
        out: list[Event] = []
        for key in list(self._active):
            track = self.tracks[key]
            if track.completed and not track.late:
                self._active.discard(key)
                continue
            if not track.completed:
                if not track.keys:
                    continue
                reason = self.decide(track, now)
                if reason is not None:
                    out.append(self.completion(track, reason, now))
            elif track.late:
                policy = self.rules.policy(track.pipeline)
                last_late = max(at for _, at in track.late)
                if (now - last_late).total_seconds() >= policy.amend_quiet_s:
                    out.append(self.amendment(track, policy))
        self._forget_unrouted(now)
        return out

    def completion(self, track: Track, reason: CompletionReason, now: datetime) -> StudyCompleted:
        series = tuple(
            SeriesSummary(series_uid=s.series_uid, modality=s.modality,
                          series_description=s.description, instance_count=s.instances)
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
        )

    def amendment(self, track: Track, policy: CompletionPolicy) -> StudyAmended:
        total = track.covered + len(track.late)
        return StudyAmended.new(
            actor=ACTOR,
            study_uid=track.study_uid,
            pipeline=track.pipeline,
            event_id=deterministic_id("study-amended", track.study_uid, track.pipeline, total),
            new_instance_count=len(track.late),
            series_uids=tuple(sorted({s for s, _ in track.late})),
            rerun=policy.rerun_on_amend,
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
                out.append(self.completion(track, CompletionReason.FORCED, now))
        return out

    def _stored_for(self, ev: InstanceStored, pipeline: str) -> None:
        assert ev.study_uid
        track = self.tracks.get((ev.study_uid, pipeline))
        if track is None:
            track = self.tracks[(ev.study_uid, pipeline)] = Track(
                ev.study_uid, pipeline, ev.occurred_at, ev.occurred_at, ev.event_id)
        track.add(ev)
        self._active.add((ev.study_uid, pipeline))

    def _forget_unrouted(self, now: datetime) -> None:
        horizon = now - timedelta(seconds=UNROUTED_KEEP_S)
        while self._unrouted:
            key, waiting = next(iter(self._unrouted.items()))
            if waiting and waiting[-1].occurred_at >= horizon:
                break
            self._unrouted.popitem(last=False)

    def pending(self) -> int:
        return sum(1 for t in self.tracks.values() if not t.completed)
