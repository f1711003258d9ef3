"""Study completion: the pure fold that weighs evidence, with a clock we move by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from events.base import deterministic_id
from events.catalogue import (
    AssociationAborted,
    AssociationReleased,
    CompletionReason,
    InstanceDuplicated,
    InstanceStored,
    RouteMatched,
    StudyAmended,
    StudyCompleted,
)
from ingest.completion import CompletionTracker, completion_id
from ingest.errors import RulesError
from ingest.rules import parse_rules
from ingest.uptime import Uptime

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
           description: str = "AXIAL", assoc: str | None = None, sha: str | None = None,
           position: float | None = None, **extra: int) -> InstanceStored:
    sop = f"1.2.3.{i}"
    sha = sha or f"{i:064x}"
    return InstanceStored.new(
        actor="scp:test", study_uid=STUDY, pipeline=pipeline,
        event_id=deterministic_id(sop, sha), occurred_at=T0 + timedelta(seconds=at),
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", sha256=sha, size_bytes=10,
        store_key=f"{sha[:2]}/{sha}.dcm", calling_ae="MOD", called_ae="LM_LTS",
        association_id=assoc, modality="MR", series_description=description,
        patient_pseudonym="p" * 32,
        slice_position_mm=float(i * 5) if position is None else position, **extra,
    )


def released(assoc: str, count: int, at_s: float) -> AssociationReleased:
    return AssociationReleased.new(
        actor="scp:test", study_uid=STUDY, occurred_at=at(at_s), association_id=assoc,
        calling_ae="MOD", called_ae="LM_LTS", instance_count=count)


def aborted(assoc: str, count: int, at_s: float, by: str = "requestor") -> AssociationAborted:
    return AssociationAborted.new(
        actor="scp:test", study_uid=STUDY, occurred_at=at(at_s), association_id=assoc,
        calling_ae="MOD", called_ae="LM_LTS", instance_count=count, aborted_by=by)


def resent(i: int, assoc: str, at_s: float) -> InstanceDuplicated:
    return InstanceDuplicated.new(
        actor="scp:test", study_uid=STUDY, occurred_at=at(at_s), sop_instance_uid=f"1.2.3.{i}",
        sha256=f"{i:064x}", calling_ae="MOD", called_ae="LM_LTS", association_id=assoc)


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


def test_a_whole_study_release_completes_within_the_grace_once_every_instance_is_folded(
) -> None:
    t = CompletionTracker(RULES)
    t.observe_all([stored(1, "s1", 0, assoc="a1"), stored(2, "s1", 0.05, assoc="a1")])
    t.observe(released("a1", 3, 0.2))  # the SCP answered 3, we have folded 2
    assert t.due(at(1.0)) == []
    t.observe(stored(3, "s1", 0.1, assoc="a1"))
    (done,) = t.due(at(0.8))
    assert isinstance(done, StudyCompleted)
    assert done.reason is CompletionReason.WHOLE_STUDY_RELEASED
    assert done.latency_s < 2.0 and not done.partial
    assert any("released normally after carrying all 3 instances" in e for e in done.evidence)
    assert any("3 slices contiguous end to end (5 mm apart)" in e for e in done.evidence)


def test_manifest_holds_completion_until_every_expected_series_is_there() -> None:
    t = CompletionTracker(RULES)
    t.observe(stored(1, "flair", 0, pipeline="bts", description="AX FLAIR", assoc="a1"))
    t.observe(stored(3, "flair", 0, pipeline="bts", description="AX FLAIR", assoc="a1"))
    t.observe(released("a1", 2, 0.1))
    assert t.due(at(30)) == []  # released and quiet, but no T1 post-contrast yet
    t.observe(stored(2, "t1", 31, pipeline="bts", description="AX T1 POST GAD", assoc="a2"))
    t.observe(released("a2", 1, 31.1))
    (done,) = t.due(at(32.5))
    assert done.reason is CompletionReason.EXPECTED_SERIES  # type: ignore[attr-defined]
    assert done.series_count == 2  # type: ignore[attr-defined]


def test_max_wait_forces_completion_without_the_manifest() -> None:
    t = CompletionTracker(RULES)
    t.observe(stored(1, "flair", 0, pipeline="bts", description="AX FLAIR"))
    assert t.due(at(59)) == []
    (done,) = t.due(at(60))
    assert done.reason is CompletionReason.MAX_WAIT  # type: ignore[attr-defined]
    assert done.partial  # type: ignore[attr-defined]  # the manifest was not satisfied


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


# --------------------------------------------------------------------------- evidence


def test_one_association_per_image_is_never_a_whole_study_and_completes_once_quiet() -> None:
    """The split sender: each association carries one image and is released; the first
    release must not complete the study (it did, 0.5 s after the first image)."""
    t = CompletionTracker(RULES)
    for i in range(1, 41):
        t.observe(stored(i, "s1", i * 0.3, assoc=f"a{i}"))
        t.observe(released(f"a{i}", 1, i * 0.3 + 0.05))
        assert t.due(at(i * 0.3 + 0.9)) == []  # past the release grace of every one
    assert t.due(at(12 + 9.9)) == []
    (done,) = t.due(at(12 + 10.1))
    assert isinstance(done, StudyCompleted)
    assert done.reason is CompletionReason.QUIET_PERIOD and done.instance_count == 40
    assert any("40 association(s) carried the study: 40 released" in e for e in done.evidence)


def test_an_aborted_association_holds_the_study_until_the_resend_carries_it_whole() -> None:
    t = CompletionTracker(RULES)
    t.observe_all([stored(i, "s1", i * 0.01, assoc="a1") for i in range(1, 26)])
    t.observe(aborted("a1", 25, 0.3))
    assert t.due(at(30)) == []  # quiet for 30 s, but 25 of 40 and the sender aborted
    # the full resend: 25 duplicates, then the 15 missing, released normally
    t.observe_all([resent(i, "a2", 40 + i * 0.01) for i in range(1, 26)])
    t.observe_all([stored(i, "s1", 40 + i * 0.01, assoc="a2") for i in range(26, 41)])
    t.observe(released("a2", 40, 40.5))
    (done,) = t.due(at(41.1))
    assert isinstance(done, StudyCompleted)
    assert done.reason is CompletionReason.WHOLE_STUDY_RELEASED
    assert done.instance_count == 40 and not done.partial


def test_an_aborted_association_never_resent_completes_at_max_wait_as_partial() -> None:
    t = CompletionTracker(RULES)
    t.observe_all([stored(i, "s1", i * 0.01, assoc="a1") for i in range(1, 26)])
    t.observe(aborted("a1", 25, 0.3))
    assert t.due(at(59.9)) == []
    (done,) = t.due(at(60.1))
    assert isinstance(done, StudyCompleted)
    assert done.reason is CompletionReason.MAX_WAIT and done.partial
    assert any("aborted by the requestor after 25 instances" in e for e in done.evidence)


def test_our_own_idle_timeout_abort_is_no_evidence_of_missing_data() -> None:
    t = CompletionTracker(RULES)
    t.observe_all([stored(i, "s1", 0, assoc="a1") for i in (1, 2, 3)])
    t.observe(aborted("a1", 3, 60, by="acceptor"))
    (done,) = t.due(at(70.5))  # quiet 10 s after... max wait 60 reached first
    assert isinstance(done, StudyCompleted) and not done.partial


def test_quiet_is_measured_in_up_time_so_a_restart_does_not_complete_a_half_study() -> None:
    """62 of 300 slices before a crash; the service is down for 10 minutes. Wall time
    says 600 s of quiet; up-time says 2 s, so nothing completes at the restart."""
    clock = Uptime()
    clock.start(at(0))
    t = CompletionTracker(RULES, clock=clock)
    t.observe_all([stored(i, "s1", i * 0.01) for i in range(1, 63)])
    clock.advance(at(2.6))  # crash at 2.6 s
    clock.start(at(602.6))  # back 10 minutes later
    clock.advance(at(603))
    assert t.due(at(603)) == []
    clock.advance(at(604.5))
    assert t.due(at(604.5)) == []
    clock.advance(at(611))
    (done,) = t.due(at(611))  # 10 s of up-time after the last slice
    assert done.reason is CompletionReason.QUIET_PERIOD  # type: ignore[attr-defined]


def test_uptime_maps_downtime_to_the_end_of_the_run_before_it() -> None:
    clock = Uptime()
    clock.start(at(0))
    clock.advance(at(10))
    clock.start(at(100))
    clock.advance(at(105))
    assert clock.at(at(5)) == 5 and clock.at(at(50)) == 10 and clock.at(at(103)) == 13
    assert clock.total() == 15


def test_declared_counts_complete_at_once_and_hold_while_one_is_missing() -> None:
    t = CompletionTracker(RULES)
    t.observe_all([stored(i, "s1", 0, images_in_acquisition=3) for i in (1, 2)])
    assert t.due(at(9.9)) == []
    assert t.due(at(40)) == []  # quiet long past, but 2 of the 3 declared
    t.observe(stored(3, "s1", 40.1, images_in_acquisition=3))
    (done,) = t.due(at(40.7))
    assert done.reason is CompletionReason.DECLARED_COUNTS  # type: ignore[attr-defined]


def test_a_gap_in_the_slices_is_no_whole_study() -> None:
    t = CompletionTracker(RULES)
    positions = [0, 5, 10, 15, 40, 45]  # a hole of 4 slices
    t.observe_all([stored(i, "s1", 0, assoc="a1", position=p)
                   for i, p in enumerate(positions, 1)])
    t.observe(released("a1", 6, 0.1))
    assert t.due(at(5)) == []
    (done,) = t.due(at(10.1))
    assert done.reason is CompletionReason.QUIET_PERIOD  # type: ignore[attr-defined]
    assert any("1 gap(s)" in e for e in done.evidence)  # type: ignore[attr-defined]


def test_late_instances_from_a_paused_split_sender_are_one_amendment() -> None:
    rules = parse_rules("pipelines:\n  lts: {completion: {quiet_period_s: 5, max_wait_s: 60}}\n")
    t = CompletionTracker(rules)
    t.observe_all([stored(i, "s1", 0, assoc="a1") for i in (1, 2, 3)])
    t.observe(released("a1", 3, 0.1))
    (done,) = t.due(at(1))
    t.observe(done)
    for k, i in enumerate(range(4, 9)):  # one association per image, 2.5 s apart
        t.observe(stored(i, "s1", 10 + k * 2.5, assoc=f"b{i}"))
        t.observe(released(f"b{i}", 1, 10 + k * 2.5 + 0.05))
        assert t.due(at(10 + k * 2.5 + 2.4)) == []
    (amended,) = t.due(at(20 + 5.1))
    assert isinstance(amended, StudyAmended)
    assert amended.new_instance_count == 5 and amended.instance_count == 8 and amended.rerun
    assert amended.reason is CompletionReason.QUIET_PERIOD


def test_changed_pixels_rerun_whatever_the_amendment_setting_and_headers_alone_do_not(
) -> None:
    rules = parse_rules("pipelines:\n  hfd: {completion: {quiet_period_s: 1, "
                        "rerun_on_amend: false}}\n")
    changed = {("bb", "cc"): True, ("bb", "dd"): False}
    t = CompletionTracker(rules, pixels_changed=lambda old, new: changed[(old[:2], new[:2])])
    t.observe(stored(1, "s1", 0, pipeline="hfd", sha="b" * 64))
    (done,) = t.due(at(2))
    t.observe(done)
    t.observe(stored(1, "s1", 3, pipeline="hfd", sha="c" * 64))  # same SOP, new pixels
    (amended,) = t.due(at(4.5))
    assert isinstance(amended, StudyAmended)
    assert amended.rerun and amended.pixels_changed == 1 and not amended.stale
    t.observe(amended)
    t2 = CompletionTracker(rules, pixels_changed=lambda old, new: changed[(old[:2], new[:2])])
    t2.observe(stored(1, "s1", 0, pipeline="hfd", sha="b" * 64))
    (done2,) = t2.due(at(2))
    t2.observe(done2)
    t2.observe(stored(1, "s1", 3, pipeline="hfd", sha="d" * 64))  # header edit only
    (header_only,) = t2.due(at(4.5))
    assert not header_only.rerun and header_only.pixels_changed == 0  # type: ignore[attr-defined]


def test_changed_pixels_mark_the_result_stale_when_the_pipeline_says_so() -> None:
    rules = parse_rules("pipelines:\n  lts: {completion: {quiet_period_s: 1, "
                        "on_changed_pixels: stale}}\n")
    t = CompletionTracker(rules)
    t.observe(stored(1, "s1", 0))
    (done,) = t.due(at(2))
    t.observe(done)
    t.observe(stored(1, "s1", 3, sha="e" * 64))
    (amended,) = t.due(at(4.5))
    assert isinstance(amended, StudyAmended)
    assert amended.stale and not amended.rerun and amended.pixels_changed == 1


def test_completion_keys_have_per_pipeline_defaults_and_a_bad_value_names_its_key() -> None:
    rules = parse_rules("pipelines:\n  hfd: {completion: {release_min_instances: 3}}\n"
                        "  mine: {ae_title: LM_MINE}\n")
    hfd, mine = rules.policy("hfd"), rules.policy("mine")
    assert (hfd.quiet_period_s, hfd.max_wait_s, hfd.rerun_on_amend) == (5.0, 300.0, True)
    assert hfd.release_min_instances == 3 and hfd.amendment_quiet_s == 5.0
    assert (mine.quiet_period_s, mine.max_wait_s, mine.on_changed_pixels) == (
        10.0, 900.0, "rerun")
    with pytest.raises(RulesError, match=r":2: pipelines.lts.completion.on_changed_pixels: "
                                         r"expected rerun or stale"):
        parse_rules("pipelines:\n  lts: {completion: {on_changed_pixels: later}}\n")
