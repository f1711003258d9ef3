"""Study completion: the pure fold, with a clock we move by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from events.base import deterministic_id
from events.catalogue import (
    CompletionReason,
    InstanceStored,
    RouteMatched,
    StudyAmended,
    StudyCompleted,
)
from ingest.completion import CompletionTracker, Release, completion_id
from ingest.rules import parse_rules

T0 = datetime(2026, 11, 1, 8, 0, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.8.498.1"

RULES = parse_rules("""
pipelines:
  bts:
    completion:
      quiet_period_s: 10
      max_wait_s: 60
      expected_series:
        - {id: flair, when: {tag: SeriesDescription, regex: "(?i)flair"}}
        - {id: t1post, when: {tag: SeriesDescription, regex: "(?i)t1.*post"}}
  lts:
    completion: {quiet_period_s: 10, max_wait_s: 60, rerun_on_amend: true, amend_quiet_s: 2}
""")


def stored(i: int, series: str, at: float, *, pipeline: str | None = "lts",
           description: str = "AXIAL", assoc: str | None = "a1") -> InstanceStored:
    sop = f"1.2.3.{i}"
    sha = f"{i:064x}"
    return InstanceStored.new(
        actor="scp:test", study_uid=STUDY, pipeline=pipeline,
        event_id=deterministic_id(sop, sha), occurred_at=T0 + timedelta(seconds=at),
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", sha256=sha, size_bytes=10,
        store_key=f"{sha[:2]}/{sha}.dcm", calling_ae="MOD", called_ae="LM_LTS",
        association_id=assoc, modality="MR", series_description=description,
        patient_pseudonym="p" * 32,
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_quiet_period_completes_with_counts_and_latency() -> None:
    t = CompletionTracker(RULES)
    t.observe_all([stored(1, "s1", 0), stored(2, "s1", 1), stored(3, "s2", 2)])
    assert t.due(at(11.9)) == []
    (done,) = t.due(at(12.5))
    assert isinstance(done, StudyCompleted)
    assert done.reason is CompletionReason.QUIET_PERIOD
    assert (done.series_count, done.instance_count) == (2, 3)
    assert done.latency_s == 10.5
    assert done.event_id == completion_id(STUDY, "lts") and done.pipeline == "lts"
    assert done.patient_pseudonym == "p" * 32
    assert {s.series_uid: s.instance_count for s in done.series} == {"s1": 2, "s2": 1}


def test_release_hint_completes_within_the_grace_once_every_instance_is_folded() -> None:
    t = CompletionTracker(RULES)
    t.observe(stored(1, "s1", 0))
    t.release(Release("a1", stored=2, at=at(0.2)))  # the SCP stored 2, we have seen 1
    assert t.due(at(1.0)) == []
    t.observe(stored(2, "s1", 0.1))
    (done,) = t.due(at(0.8))
    assert done.reason is CompletionReason.ASSOCIATION_RELEASED  # type: ignore[attr-defined]
    assert done.latency_s < 2.0  # type: ignore[attr-defined]


def test_manifest_holds_completion_until_every_expected_series_is_there() -> None:
    t = CompletionTracker(RULES)
    t.observe(stored(1, "flair", 0, pipeline="bts", description="AX FLAIR"))
    t.release(Release("a1", stored=1, at=at(0.1)))
    assert t.due(at(30)) == []  # released and quiet, but no T1 post-contrast yet
    t.observe(stored(2, "t1", 31, pipeline="bts", description="AX T1 POST GAD", assoc="a2"))
    (done,) = t.due(at(32.5))
    assert done.reason is CompletionReason.EXPECTED_SERIES  # type: ignore[attr-defined]
    assert done.series_count == 2  # type: ignore[attr-defined]


def test_max_wait_forces_completion_without_the_manifest() -> None:
    t = CompletionTracker(RULES)
    t.observe(stored(1, "flair", 0, pipeline="bts", description="AX FLAIR"))
    assert t.due(at(59)) == []
    (done,) = t.due(at(60))
    assert done.reason is CompletionReason.MAX_WAIT  # type: ignore[attr-defined]


def test_late_instances_become_one_amendment_with_rerun() -> None:
    t = CompletionTracker(RULES)
    t.observe(stored(1, "s1", 0))
    (done,) = t.due(at(10))
    t.observe(done)
    t.observe(done)  # redelivered: changes nothing
    t.observe_all([stored(2, "s2", 20), stored(3, "s2", 20.5)])
    assert t.due(at(21)) == []  # amend_quiet_s = 2
    (amended,) = t.due(at(23))
    assert isinstance(amended, StudyAmended)
    assert amended.new_instance_count == 2 and amended.series_uids == ("s2",)
    assert amended.rerun is True
    t.observe(amended)
    t.observe(amended)
    assert t.due(at(100)) == []  # never completes or amends twice


def test_rebuilding_from_the_log_gives_the_same_state_and_no_second_completion() -> None:
    live = CompletionTracker(RULES)
    log: list = [stored(1, "s1", 0), stored(2, "s1", 1)]
    live.observe_all(log)
    (done,) = live.due(at(12))
    log.append(done)
    # an instance the completion did not count (it was folded after the decision)
    log.insert(2, stored(3, "s9", 11.9))
    rebuilt = CompletionTracker(RULES)
    rebuilt.observe_all(log)
    track = rebuilt.tracks[(STUDY, "lts")]
    assert track.completed and track.covered == 2
    (amended,) = rebuilt.due(at(20))  # the uncounted instance is late: amended, not lost
    assert isinstance(amended, StudyAmended) and amended.series_uids == ("s9",)


def test_general_ae_instances_follow_their_series_route() -> None:
    t = CompletionTracker(RULES)
    routed = RouteMatched.new(actor="scp", study_uid=STUDY, rule_ids=("r",),
                              pipelines=("bts", "lts"), called_ae="LASTMILE", series_uid="s1")
    t.observe(stored(1, "s1", 0, pipeline=None))  # stored before its route was folded
    t.observe(routed)
    t.observe(stored(2, "s1", 1, pipeline=None))
    t.observe(stored(3, "s2", 1, pipeline=None))  # a series routed nowhere
    assert {k[1] for k in t.tracks} == {"bts", "lts"}
    assert len(t.tracks[(STUDY, "lts")].keys) == 2


def test_forced_completion_for_a_pipeline_the_study_was_not_routed_to() -> None:
    t = CompletionTracker(RULES)
    events = [stored(1, "s1", 0), stored(2, "s1", 0)]
    t.observe_all(events)
    (forced,) = t.force(STUDY, "hfd", at(1), events)
    assert forced.reason is CompletionReason.FORCED and forced.instance_count == 2
    assert forced.pipeline == "hfd"
    assert t.force(STUDY, None, at(1)) != []  # lts still pending
    t.observe(forced)
    assert [e.pipeline for e in t.force(STUDY, None, at(1))] == ["lts"]


def test_amendment_rerun_follows_the_pipeline_setting() -> None:
    rules = parse_rules("pipelines:\n  hfd: {completion: {quiet_period_s: 1, "
                        "rerun_on_amend: false, amend_quiet_s: 0}}\n")
    t = CompletionTracker(rules)
    t.observe(stored(1, "s1", 0, pipeline="hfd"))
    (done,) = t.due(at(2))
    t.observe(done)
    t.observe(stored(2, "s1", 3, pipeline="hfd"))
    (amended,) = t.due(at(3))
    assert isinstance(amended, StudyAmended) and amended.rerun is False
