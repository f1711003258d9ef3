"""The review rules without a browser: users and password hashes, sessions, the form,
stale cases, QC, assignment ids, blinded labels and the per-reader order."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboards.review.auth import (
    AuthError,
    Role,
    User,
    Users,
    authenticate,
    check_strength,
    hash_password,
    load_users,
    parse_users,
    save_users,
    verify_password,
    with_user,
)
from dashboards.review.blinded import (
    BlindedStudy,
    BlindedStudyError,
    masks_of_run,
    ordered_for,
    parse_blinded_study,
    unblinding,
)
from dashboards.review.policy import (
    ReviewForm,
    ReviewRefused,
    assignments,
    blinded_label,
    build_blinded_review,
    build_edit,
    build_qc,
    build_review,
    cases_of_study,
    current_cases,
    questions,
    reader_order,
)
from events.base import Event
from events.catalogue import (
    EditSubmitted,
    Finding,
    InferenceCompleted,
    Measurement,
    QcPassed,
    ReviewSubmitted,
)

READER = User("dr.a", frozenset({Role.READER}), ("hfd", "bts", "lts"))
OTHER = User("dr.b", frozenset({Role.READER}))
QC = User("qc.1", frozenset({Role.QC}), ("hfd",))
GOV = User("gov.1", frozenset({Role.GOVERNANCE}))


def completed(study: str = "1.2.3", pipeline: str = "hfd", run_key: str = "run-1",
              **kw: Any) -> InferenceCompleted:
    findings = (
        Finding(label="right_hip", classification="fracture", probability=0.9, box=(1, 2, 3, 4),
                sop_instance_uid="1.1"),
        Finding(label="right_hip", classification="normal", probability=0.6,
                sop_instance_uid="1.2"),
        Finding(label="left_hip", classification="normal", probability=0.95),
    ) if pipeline == "hfd" else ()
    base: dict[str, Any] = dict(run_key=run_key, model_name="m", model_version="1",
                                   runtime="cpu", runtime_reason="test", duration_s=1.0,
                                   inference_s=0.5, findings=findings)
    base.update(kw)
    return InferenceCompleted.new(actor="worker", study_uid=study, pipeline=pipeline, **base)


def qc_passed(res: InferenceCompleted) -> QcPassed:
    return res.caused(QcPassed, actor="qc.1", run_key=res.run_key)


# --------------------------------------------------------------------------- users


def test_password_hash_verifies_only_the_right_password_and_is_salted() -> None:
    h1, h2 = hash_password("s3cret pass"), hash_password("s3cret pass")
    assert h1 != h2 and h1.startswith("scrypt$")
    assert verify_password("s3cret pass", h1) and verify_password("s3cret pass", h2)
    assert not verify_password("s3cret pasS", h1)
    assert not verify_password("s3cret pass", "scrypt$broken")
    assert not verify_password("s3cret pass", None)
    with pytest.raises(AuthError):
        hash_password("")


def test_users_file_round_trip_mode_0600_and_readable_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    users = with_user(Users(), User("dr.a", frozenset({Role.READER, Role.QC}), ("hfd",),
                                    hash_password("pw-one")))
    users = with_user(users, User("boss", frozenset({Role.ADMIN}), (), hash_password("pw-2")))
    save_users(path, users)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = load_users(path)
    assert back == users
    assert authenticate(back, "dr.a", "pw-one") == users.get("dr.a")
    assert authenticate(back, "dr.a", "pw-2") is None
    assert authenticate(back, "nobody", "pw-one") is None
    assert back.readers_of("hfd") == ["dr.a"] and back.readers_of("bts") == []
    boss = back.get("boss")
    assert boss is not None and boss.has(Role.QC) and boss.has(Role.GOVERNANCE)
    os.chmod(path, 0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        load_users(path)


@pytest.mark.parametrize("text, why", [
    ('[users.x]\nroles = ["wizard"]', "unknown role"),
    ('[users.x]\nroles = ["reader"]\nshoe = 1', "unknown keys"),
    ('[users."bad name!"]\nroles = ["reader"]', "not a valid entry"),
    ('[users.x]\nroles = []', "at least one role"),
    ("not toml =", "users"),
])
def test_malformed_users_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(AuthError, match=why):
        parse_users(text)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_sessions_end_on_sign_out_idle_age_and_a_changed_users_file() -> None:
    from dashboards.review.sessions import SessionStore, still_valid

    clock = Clock()
    store = SessionStore(idle_s=60, absolute_s=600, clock=clock)
    user = User("dr.a", frozenset({Role.READER}), (), hash_password("a long pass phrase"))
    token, s = store.create(user, "10.0.0.1")
    other, _ = store.create(user, "10.0.0.2")
    assert store.get(token) is s and still_valid(s, user)
    assert store.get("forged-" + token) is None and store.get(None) is None
    clock.t += 59  # activity keeps it alive...
    assert store.get(token) is s
    clock.t += 61  # ...idleness ends it
    assert store.get(token) is None and store.get(other) is None
    token, s = store.create(user, "10.0.0.1")
    for _ in range(12):  # active all along, but older than absolute_s
        clock.t += 55
        store.get(token)
    assert store.get(token) is None
    token, s = store.create(user, "10.0.0.1")
    assert store.end(token) is s and store.get(token) is None  # sign-out
    token, s = store.create(user, "10.0.0.1")
    keep, _ = store.create(user, "10.0.0.3")
    assert store.end_user("dr.a", keep=keep) == 1 and store.get(token) is None
    assert store.get(keep) is not None
    # the users file decides too: a new password, disabled, removed
    assert not still_valid(s, User("dr.a", user.roles, (), hash_password("another phrase")))
    assert not still_valid(s, User("dr.a", user.roles, (), user.password_hash, disabled=True))
    assert not still_valid(s, None)


def test_signin_limits_per_user_and_per_address_slide_with_the_window() -> None:
    from dashboards.review.sessions import SigninLimiter

    clock = Clock()
    lim = SigninLimiter(per_user=3, per_address=5, window_s=100, clock=clock)
    for i in range(3):
        assert lim.check("Dr.A", "1.1.1.1") is None
        lim.failed("dr.a", f"1.1.1.{i}")
        clock.t += 10
    limited = lim.check("dr.a", "9.9.9.9")  # any address: the name is locked
    assert limited is not None and limited.scope == "user" and limited.failures == 3
    assert limited.retry_after_s == pytest.approx(70)
    assert lim.check("dr.b", "9.9.9.9") is None
    for name in ("u1", "u2", "u3", "u4", "u5"):  # one address, many names
        lim.failed(name, "6.6.6.6")
    limited = lim.check("someone.else", "6.6.6.6")
    assert limited is not None and limited.scope == "address"
    clock.t += 71  # the oldest failure left the window: one more try for dr.a
    assert lim.check("dr.a", "9.9.9.9") is None
    lim.succeeded("dr.a")
    assert lim.check("dr.a", "9.9.9.9") is None


@pytest.mark.parametrize("password, why", [
    ("short1!", "too short"),
    ("password1234", "too weak"),
    ("qwertyuiop123", "too weak"),
    ("house house house", "too weak"),
])
def test_weak_passwords_are_refused_with_the_reason(password: str, why: str) -> None:
    with pytest.raises(AuthError, match=why):
        check_strength(password, "dr.house")


def test_a_strong_password_passes() -> None:
    check_strength("cobalt lantern ferry quartz", "dr.house")


# --------------------------------------------------------------------------- cases


def test_questions_take_the_most_probable_finding_per_hip() -> None:
    qs = {q.label: q for q in questions(completed())}
    assert qs["right_hip"].ai == "fracture" and qs["left_hip"].ai == "normal"
    assert set(qs["right_hip"].choices) >= {"normal", "fracture", "hardware"}
    (q,) = questions(completed(pipeline="bts", progression=True))
    assert (q.label, q.ai) == ("lesion", "progression")
    (q,) = questions(completed(pipeline="lts"))
    assert (q.label, q.ai) == ("mask", "acceptable")


def test_quick_agree_records_the_ai_reads_with_a_deterministic_id() -> None:
    res = completed()
    case = cases_of_study([res, qc_passed(res)])["run-1"]
    ev = build_review(case, READER, ReviewForm(quick_agree=True), seconds_on_case=12.34)
    assert ev.actor == ev.reader == "dr.a" and ev.run_key == "run-1"
    assert ev.agree == {"left_hip": True, "right_hip": True}
    assert ev.reads == {"left_hip": "normal", "right_hip": "fracture"}
    assert ev.seconds_on_case == 12.3 and ev.causation_id == res.event_id
    again = build_review(case, READER, ReviewForm(quick_agree=True), seconds_on_case=50)
    assert again.event_id == ev.event_id  # a double click is one fact
    other = build_review(case, OTHER, ReviewForm(quick_agree=True), seconds_on_case=1)
    assert other.event_id != ev.event_id


def test_detailed_form_requires_answers_and_derives_agreement_from_the_read() -> None:
    res = completed()
    case = cases_of_study([res, qc_passed(res)])["run-1"]
    with pytest.raises(ReviewRefused, match="your own read for right_hip.*confidence"):
        build_review(case, READER, ReviewForm(agree={"right_hip": False, "left_hip": True}),
                     seconds_on_case=1)
    with pytest.raises(ReviewRefused, match="not a choice"):
        build_review(case, READER, ReviewForm(agree={"right_hip": False, "left_hip": True},
                                              reads={"right_hip": "broken"}, confidence=3),
                     seconds_on_case=1)
    with pytest.raises(ReviewRefused, match="between 1 and 5"):
        build_review(case, READER, ReviewForm(agree={"right_hip": True, "left_hip": True},
                                              confidence=9), seconds_on_case=1)
    ev = build_review(case, READER, ReviewForm(
        agree={"right_hip": False, "left_hip": True}, reads={"right_hip": "hardware"},
        confidence=4, comment="  plate and screws  "), seconds_on_case=30)
    assert ev.reads == {"right_hip": "hardware", "left_hip": "normal"}
    assert ev.agree == {"right_hip": False, "left_hip": True}
    assert ev.comment == "plate and screws" and ev.confidence == 4


def test_refusals_wrong_role_pipeline_qc_gate_stale_and_already_reviewed() -> None:
    res = completed()
    gated = cases_of_study([res])["run-1"]
    with pytest.raises(ReviewRefused, match="has not passed QC"):
        build_review(gated, READER, ReviewForm(quick_agree=True), seconds_on_case=1)
    case = cases_of_study([res, qc_passed(res)])["run-1"]
    with pytest.raises(ReviewRefused, match="reader role"):
        build_review(case, GOV, ReviewForm(quick_agree=True), seconds_on_case=1)
    bts_only = User("dr.c", frozenset({Role.READER}), ("bts",))
    with pytest.raises(ReviewRefused, match="does not read hfd"):
        build_review(case, bts_only, ReviewForm(quick_agree=True), seconds_on_case=1)
    newer = completed(run_key="run-2")
    cases = cases_of_study([res, qc_passed(res), newer])
    assert cases["run-1"].superseded_by == "run-2"
    assert [c.run_key for c in current_cases(cases)] == ["run-2"]
    with pytest.raises(ReviewRefused, match="superseded"):
        build_review(cases["run-1"], READER, ReviewForm(quick_agree=True), seconds_on_case=1)
    done = build_review(case, READER, ReviewForm(quick_agree=True), seconds_on_case=1)
    reviewed = cases_of_study([res, qc_passed(res), done])["run-1"]
    with pytest.raises(ReviewRefused, match="already reviewed"):
        build_review(reviewed, READER, ReviewForm(quick_agree=True), seconds_on_case=1)
    # and others' reads stay hidden until one's own is in
    assert reviewed.visible_reviews("dr.b") == ()
    assert reviewed.visible_reviews("dr.a") == (done,)


def test_qc_decisions_need_the_role_a_reason_to_reject_and_happen_once() -> None:
    res = completed()
    case = cases_of_study([res])["run-1"]
    with pytest.raises(ReviewRefused, match="qc role"):
        build_qc(case, READER, accept=True, reason=None, seconds_on_case=3)
    with pytest.raises(ReviewRefused, match="needs a reason"):
        build_qc(case, QC, accept=False, reason=" ", seconds_on_case=3)
    passed = build_qc(case, QC, accept=True, reason=None, seconds_on_case=3.21)
    assert isinstance(passed, QcPassed) and passed.actor == "qc.1"
    assert passed.seconds_on_case == 3.2
    rejected = build_qc(case, QC, accept=False, reason="wrong body part", seconds_on_case=1)
    assert rejected.event_id == passed.event_id  # one decision per run, whichever first
    with pytest.raises(ReviewRefused, match="already QC'd"):
        build_qc(cases_of_study([res, passed])["run-1"], QC, accept=True, reason=None,
                 seconds_on_case=1)


def test_assignment_waits_for_qc_on_gated_pipelines_and_ids_are_stable() -> None:
    hfd = completed()
    assert assignments(hfd, ["dr.a", "dr.b"]) == []
    made = assignments(qc_passed(hfd), ["dr.a", "dr.b"])
    assert [(a.reader, a.run_key, a.actor) for a in made] == [
        ("dr.a", "run-1", "worklist"), ("dr.b", "run-1", "worklist")]
    assert [a.event_id for a in made] == [a.event_id for a in
                                          assignments(qc_passed(hfd), ["dr.a", "dr.b"])]
    bts = completed(pipeline="bts", run_key="run-9")
    assert [a.reader for a in assignments(bts, ["dr.a"])] == ["dr.a"]
    assert assignments(bts.caused(QcPassed, actor="x", run_key="run-9"), ["dr.a"]) == []


def test_edit_event_names_the_stored_file_and_is_idempotent() -> None:
    res = completed(pipeline="bts")
    case = cases_of_study([res])["run-1"]
    ev = build_edit(case, READER, store_key="ab/cd/x.dcm", sha256="x" * 64)
    assert isinstance(ev, EditSubmitted) and ev.actor == "dr.a" and ev.source == "lastmile"
    assert build_edit(case, READER, store_key="ab/cd/x.dcm", sha256="x" * 64).event_id == \
        ev.event_id
    with pytest.raises(ReviewRefused):
        build_edit(case, GOV, store_key="k", sha256="y" * 64)


# --------------------------------------------------------------------------- blinding


def test_blinded_labels_hide_the_source_and_depend_on_the_salt() -> None:
    a = blinded_label(b"salt-one-0123456789", "1.2.3", "ai")
    assert a != blinded_label(b"salt-one-0123456789", "1.2.3", "expert")
    assert a != blinded_label(b"salt-two-0123456789", "1.2.3", "ai")
    assert a != blinded_label(b"salt-one-0123456789", "1.2.4", "ai")
    assert "ai" not in a and len(a) == 12


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="abcdef0123456789", min_size=4, max_size=12), min_size=2,
                max_size=5, unique=True), st.text(min_size=1, max_size=10))
def test_reader_order_is_a_stable_permutation(labels: list[str], reader: str) -> None:
    order = reader_order(labels, reader, "run-1")
    assert sorted(order) == sorted(labels)
    assert order == reader_order(list(reversed(labels)), reader, "run-1")


def test_reader_orders_differ_between_readers() -> None:
    labels = [f"label{i}" for i in range(3)]
    orders = {tuple(reader_order(labels, f"reader{i}", "run-1")) for i in range(12)}
    assert len(orders) > 1


def test_blinded_study_masks_review_and_unblinding() -> None:
    study = parse_blinded_study('pipeline = "lts"\nsalt = "a-long-secret-salt-value"\n'
                                'readers = ["dr.a"]\n')
    res = completed(pipeline="lts", result_keys=("run-1/seg-1.dcm", "run-1/sr-2.dcm"),
                    measurements=(Measurement(name="volume_left_lobe", value=1.0, unit="mL"),))
    expert = build_edit(cases_of_study([res])["run-1"], User("adm", frozenset({Role.ADMIN})),
                        store_key="ab/cd/e.dcm", sha256="e" * 64, source="expert")
    events: list[Event] = [res, expert]
    masks = masks_of_run(study, res, events)
    assert {m.source for m in masks} == {"ai", "expert"}  # no novice mask registered yet
    assert {m.label for m in masks} == {study.label("1.2.3", "ai"),
                                        study.label("1.2.3", "expert")}
    ordered = ordered_for(masks, "dr.a", "run-1")
    assert sorted(m.label for m in ordered) == sorted(m.label for m in masks)
    key = unblinding(study, events)
    assert key[study.label("1.2.3", "ai")] == "ai"
    assert key[study.label("1.2.3", "novice")] == "novice"
    case = cases_of_study(events)["run-1"]
    label = ordered[0].label
    ev = build_blinded_review(case, READER, label=label, read="acceptable", confidence=4,
                              comment=None, seconds_on_case=5, allowed_readers=study.readers)
    assert isinstance(ev, ReviewSubmitted)
    assert ev.blinded_label == label and ev.reads == {"mask": "acceptable"}
    assert "ai" not in repr(ev.reads) and ev.agree == {}
    with pytest.raises(ReviewRefused, match="not a reader of this blinded study"):
        build_blinded_review(case, OTHER, label=label, read="acceptable", confidence=4,
                             comment=None, seconds_on_case=5, allowed_readers=study.readers)
    with pytest.raises(ReviewRefused, match="please answer"):
        build_blinded_review(case, READER, label=label, read=None, confidence=None,
                             comment=None, seconds_on_case=5, allowed_readers=())
    rated = cases_of_study([*events, ev])["run-1"]
    with pytest.raises(ReviewRefused, match="already reviewed"):
        build_blinded_review(rated, READER, label=label, read="acceptable", confidence=4,
                             comment=None, seconds_on_case=5, allowed_readers=())
    other_label = ordered[1].label  # the next mask is still open
    build_blinded_review(rated, READER, label=other_label, read="unacceptable", confidence=2,
                         comment=None, seconds_on_case=5, allowed_readers=())


@pytest.mark.parametrize("text", ['salt = "short"', 'salt = "long-enough-salt-123"\nx = 1',
                                  'salt = "long-enough-salt-123"\nsources = ["ai", "ai"]'])
def test_bad_blinded_study_is_refused(text: str) -> None:
    with pytest.raises(BlindedStudyError):
        parse_blinded_study(text)


def test_blinded_study_defaults() -> None:
    s = parse_blinded_study('salt = "long-enough-salt-123"')
    assert s == BlindedStudy("lts", b"long-enough-salt-123", (), ("ai", "expert", "novice"))


def test_a_blinded_study_file_others_can_read_is_refused(tmp_path: Path) -> None:
    from dashboards.review.blinded import BlindedStudyError, load_blinded_study

    path = tmp_path / "blinded.toml"
    path.write_text('pipeline = "lts"\nsalt = "a-salt-of-sixteen-chars"\nreaders = ["r"]\n')
    path.chmod(0o644)
    with pytest.raises(BlindedStudyError, match="readable by other users.*chmod 600"):
        load_blinded_study(path)
    path.chmod(0o600)
    assert load_blinded_study(path).readers == ("r",)


def test_only_a_complete_mask_set_is_offered() -> None:
    from dashboards.review.blinded import BlindedMask, BlindedStudy, complete

    study = BlindedStudy("lts", b"salt-0123456789abcdef", ("r",))
    ai = BlindedMask("L1", "ai", "seg-1.dcm", None)
    expert = BlindedMask("L2", "expert", None, "k2")
    novice = BlindedMask("L3", "novice", None, "k3")
    assert not complete(study, [ai]) and not complete(study, [ai, expert])
    assert complete(study, [novice, ai, expert])
