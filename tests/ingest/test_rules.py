"""Routing rules and manifests: pure evaluation, and files refused with line and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicom_rules.conditions import AllOf, AnyOf, Equals, Exists, Not, OneOf, Range, Regex, evaluate
from dicom_rules.parse import canonical_tag
from events.catalogue import Stage
from events.deployments import DeployedPipeline
from ingest.errors import RulesError
from ingest.rules import (
    EXAMPLE_RULES,
    CompletionPolicy,
    SeriesExpectation,
    load_rules,
    manifest_status,
    parse_rules,
    route,
    with_deployed,
)
from ingest.rules_file import RulesFile

MR_BRAIN = {"Modality": ("MR",), "BodyPartExamined": ("BRAIN",)}
CT_ABDOMEN = {"Modality": ("CT",), "StudyDescription": ("CT ABD/PELVIS W CONTRAST",)}
CR_PELVIS = {"Modality": ("CR",), "BodyPartExamined": ("PELVIS",)}
DX_HIP = {"Modality": ("DX",), "StudyDescription": ("XR HIP LEFT 2 VIEWS",)}


def test_each_operator_matches_and_misses() -> None:
    tags = {"Modality": ("CT",), "SliceThickness": ("0.625",), "ImageType": ("ORIGINAL",
            "PRIMARY", "AXIAL")}
    assert evaluate(Equals("Modality", "CT"), tags)[0]
    assert not evaluate(Equals("Modality", "MR"), tags)[0]
    assert evaluate(OneOf("Modality", ("MR", "CT")), tags)[0]
    assert not evaluate(OneOf("Modality", ("MR", "CR")), tags)[0]
    assert evaluate(Regex("ImageType", re.compile("AXIAL")), tags)[0]  # any value of a multi
    assert not evaluate(Regex("Modality", re.compile("^M")), tags)[0]
    assert evaluate(Range("SliceThickness", None, 1.0), tags)[0]
    assert not evaluate(Range("SliceThickness", 1.0, 5.0), tags)[0]
    assert not evaluate(Range("Modality", 0, 10), tags)[0]  # not a number: no match
    assert evaluate(Exists("Modality", True), tags)[0]
    assert evaluate(Exists("BodyPartExamined", False), tags)[0]
    assert not evaluate(Equals("BodyPartExamined", "X"), tags)[0]  # absent never equals


def test_combinators() -> None:
    tags = {"Modality": ("MR",)}
    yes, no = Equals("Modality", "MR"), Equals("Modality", "CT")
    assert evaluate(AllOf((yes, Not(no))), tags)[0]
    assert not evaluate(AllOf((yes, no)), tags)[0]
    assert evaluate(AnyOf((no, yes)), tags)[0]
    assert not evaluate(AnyOf((no, no)), tags)[0]


def test_example_rules_route_the_papers_three_pipelines() -> None:
    rules = load_rules(EXAMPLE_RULES)
    assert route(rules, MR_BRAIN).pipelines == ("bts",)
    assert route(rules, CT_ABDOMEN).pipelines == ("lts",)
    assert route(rules, CR_PELVIS).pipelines == ("hfd",)
    assert route(rules, DX_HIP).pipelines == ("hfd",)
    other = route(rules, {"Modality": ("US",)})
    assert other.fallback and other.pipelines == () and other.rule_ids == ("store-only",)
    # the disabled thin-slice rule never routes, even when its condition holds
    thin = route(rules, {**CT_ABDOMEN, "SliceThickness": ("1.0",)})
    assert "thin-slices-only" not in thin.rule_ids
    assert rules.ae_titles() == {"LM_BTS": "bts", "LM_LTS": "lts", "LM_HFD": "hfd"}
    assert [e.id for e in rules.policy("bts").expected_series] == [
        "axial-flair", "t1-post-contrast"]


def test_priority_order_and_final_stop_later_rules() -> None:
    rules = parse_rules("""
rules:
  - {id: low, priority: 1, pipelines: [lts], when: {tag: Modality, equals: CT}}
  - {id: high, priority: 9, final: true, pipelines: [bts], when: {tag: Modality, equals: CT}}
  - {id: fb, fallback: true, pipelines: [hfd]}
""")
    decision = route(rules, {"Modality": ("CT",)})
    assert decision.rule_ids == ("high",) and decision.pipelines == ("bts",)
    assert route(rules, {"Modality": ("MR",)}).pipelines == ("hfd",)


def test_all_matching_rules_contribute_without_final() -> None:
    rules = parse_rules("""
rules:
  - {id: a, pipelines: [lts], when: {tag: Modality, equals: CT}}
  - {id: b, pipelines: [bts, lts], when: {tag: '(0008,0060)', one_of: [CT]}}
""")
    decision = route(rules, {"Modality": ("CT",)})
    assert decision.rule_ids == ("a", "b") and decision.pipelines == ("lts", "bts")
    assert "Modality='CT'" in decision.reasons[0]


def test_reasons_never_show_identity_values() -> None:
    rules = parse_rules("""
rules:
  - {id: vip, pipelines: [bts], when: {tag: PatientName, regex: "^Doe"}}
""")
    decision = route(rules, {"PatientName": ("Doe^Jane",)})
    assert decision.matched
    assert "Doe" not in " ".join(decision.reasons)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("rules:\n  - id: a\n    pipelines: [bts]\n    when: {tag: Modality, equal: MR}\n",
         4, "unknown key 'equal'"),
        ("rules:\n  - id: a\n    pipelines: [No_Pe]\n    when: {tag: Modality, equals: MR}\n",
         3, "'No_Pe' is not a pipeline name"),
        ("rules:\n  - id: a\n    pipelines: [bts]\n    when: {tag: NotATag, equals: MR}\n",
         4, "unknown DICOM tag"),
        ("rules:\n  - id: a\n    pipelines: [bts]\n    when: {tag: Modality, regex: '('}\n",
         4, "invalid regular expression"),
        ("rules:\n  - id: a\n    pipelines: [bts]\n", 2, "a condition is required"),
        ("rules:\n  - id: a\n    pipelines: [bts]\n    when:\n      tag: SliceThickness\n"
         "      range: {min: 5, max: 1}\n", 6, "greater than max"),
        ("pipelines:\n  bts:\n    completion:\n      expected_series:\n"
         "        - {id: x, when: {tag: PatientID, equals: '1'}}\n", 5, "series tags"),
        ("rules:\n  - id: a\n     pipelines: [bts]\n", 3, "not valid YAML"),
        ("rules:\n  - {id: a, pipelines: [bts], when: {tag: Modality, equals: MR}}\n"
         "  - {id: a, pipelines: [bts], when: {tag: Modality, equals: CT}}\n", 3, "duplicate"),
    ],
)
def test_invalid_files_are_refused_with_line_and_key(text: str, line: int, needle: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "site.yaml")
    message = str(info.value)
    assert message.startswith(f"site.yaml:{line}"), message
    assert needle in message


def test_canonical_tags() -> None:
    assert canonical_tag("(0008,0060)") == "Modality"
    assert canonical_tag("00080060") == "Modality"
    assert canonical_tag("(0009,1001)") == "00091001"  # private: kept as a number
    assert canonical_tag("Nonsense") is None


def test_manifest_needs_every_expected_series() -> None:
    policy = CompletionPolicy(expected_series=(
        SeriesExpectation("flair", Regex("SeriesDescription", re.compile("(?i)flair"))),
        SeriesExpectation("t1post", Regex("SeriesDescription", re.compile("(?i)t1.*post"))),
    ))
    flair = {"SeriesDescription": ("AX FLAIR",)}
    t1 = {"SeriesDescription": ("AX T1 POST",)}
    assert manifest_status(policy, [flair]) == (False, ("t1post",))
    assert manifest_status(policy, [flair, t1]) == (True, ())


def test_rules_file_reload_keeps_old_rules_on_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {id: a, pipelines: [bts], when: {tag: Modality, equals: MR}}\n")
    rules = RulesFile.open(path)
    assert route(rules(), MR_BRAIN).pipelines == ("bts",)
    path.write_text("rules:\n  - {id: a, pipelines: [bts], when: {tag: Modality, eq: CT}}\n")
    assert rules.poll() is False
    assert rules.last_error is not None and ":2:" in rules.last_error
    assert route(rules(), MR_BRAIN).pipelines == ("bts",)  # old rules still in force
    path.write_text("rules:\n  - {id: b, pipelines: [lts], when: {tag: Modality, equals: MR}}\n"
                    "# changed size\n")
    assert rules.poll() is True
    assert route(rules(), MR_BRAIN).pipelines == ("lts",)


values = st.text(alphabet="ABCDEFGHIJ0123456789 .", max_size=12)


@given(tags=st.dictionaries(st.sampled_from(["Modality", "BodyPartExamined",
                                             "StudyDescription", "SeriesDescription"]),
                            st.tuples(values), max_size=4))
def test_routing_is_total_and_explained(tags: dict[str, tuple[str, ...]]) -> None:
    """Any tag values: a decision (never an exception), a reason per matched rule, and
    only pipelines the file declares."""
    rules = load_rules(EXAMPLE_RULES)
    decision = route(rules, tags)
    assert len(decision.reasons) == len(decision.rule_ids) >= 1
    assert set(decision.pipelines) <= set(rules.pipelines)
    assert route(rules, tags) == decision


# --------------------------------------------------------------- deployed pipelines (issue 16)


def _deployed(name: str, ae: str | None, *, retired: bool = False,
              sha: str = "a" * 64) -> DeployedPipeline:
    return DeployedPipeline(name, "1.0.0", sha, None, Stage.VALIDATION, ae, "os:x",
                            retired=retired)


def test_rules_may_name_a_pipeline_the_log_deploys() -> None:
    rules = parse_rules("rules:\n  - {id: own, pipelines: [myhip], "
                        "when: {tag: Modality, equals: CR}}\n")
    assert rules.undeclared() == ("myhip",)
    assert route(rules, CR_PELVIS).pipelines == ("myhip",)
    assert "LM_MYHIP" not in rules.ae_titles()


def test_deployed_pipelines_bring_their_ae_titles_and_retired_ones_lose_them() -> None:
    rules = parse_rules("pipelines:\n  listed: {}\n")
    merged, conflicts = with_deployed(rules, {
        "myhip": _deployed("myhip", "LM_MYHIP"),
        "listed": _deployed("listed", "LM_LISTED"),
        "hfd": _deployed("hfd", "LM_HFD", retired=True),
        "clash": _deployed("clash", "LM_BTS"),
    })
    aes = merged.ae_titles()
    assert aes["LM_MYHIP"] == "myhip" and aes["LM_LISTED"] == "listed"
    assert "LM_HFD" not in aes  # retired: refused, not accepted and dropped
    assert aes["LM_BTS"] == "bts" and conflicts == (
        "deployed pipeline clash: AE title LM_BTS is already used by pipeline bts; not taken",)
    assert merged.policy("myhip") == CompletionPolicy()
    assert merged.sha256 != rules.sha256
    again, _ = with_deployed(rules, {"myhip": _deployed("myhip", "LM_MYHIP", sha="b" * 64)})
    assert again.sha256 != with_deployed(rules, {"myhip": _deployed("myhip", "LM_MYHIP")})[0].sha256


def test_rules_file_follows_deployments_and_asks_the_log_before_each_answer() -> None:
    rf = RulesFile.open(None)
    assert not rf.recognise("LM_MYHIP")
    asked: list[int] = []

    def refresh() -> None:  # what ingest.deployments does: read the log, set_deployed
        asked.append(1)
        rf.set_deployed({"myhip": _deployed("myhip", "LM_MYHIP")})

    rf.refresh = refresh
    assert rf.recognise("LM_MYHIP") and asked == [1]
    assert rf.recognise("LM_MYHIP") and asked == [1, 1]  # asked again: it may be retired
    assert not rf.set_deployed({"myhip": _deployed("myhip", "LM_MYHIP")})  # no change

    def retired() -> None:  # retired a moment ago: the very next association is refused
        rf.set_deployed({"myhip": _deployed("myhip", "LM_MYHIP", retired=True)})

    rf.refresh = retired
    assert not rf.recognise("LM_MYHIP")

    def unreachable() -> None:
        raise TimeoutError

    rf.set_deployed({"myhip": _deployed("myhip", "LM_MYHIP")})
    rf.refresh = unreachable  # the log cannot be reached: the rules last seen decide
    assert rf.recognise("LM_MYHIP") and not rf.recognise("LM_OTHER")
