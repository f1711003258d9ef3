"""Issue 16: series selection on any attribute with the routing rule language, tie-breaks
the pipeline file names, and every series considered in the audit (failed runs too)."""

from __future__ import annotations

import copy

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from demo.phantoms import brain_mr_study
from dicom_rules.parse import parse_condition
from engine.errors import SpecError
from engine.feed import feed_study
from engine.ops.selection import SelectionRule, describe_series, select_series
from engine.registry import deployed_event
from engine.spec import REFERENCE_DIR, parse_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import InferenceFailed, SeriesSelected, Stage
from events.jetstream import EventBus
from tests.engine.conftest import SECRET, RunningWorker, has, wait_for

AGENT = "GADOVIST 1 MMOL/ML"  # a value: it must never appear in a reason


def with_post_contrast(seed: int) -> tuple[list[Dataset], str, str, str]:
    """A brain MR study plus a post-contrast copy of its FLAIR (same slices, a later
    series number, ContrastBolusAgent set). Returns (datasets, pre, post, localizer)."""
    study = brain_mr_study(seed)
    flair = [d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"]
    post_uid = generate_uid()
    post = []
    for d in flair:
        c = copy.deepcopy(d)
        c.SeriesInstanceUID, c.SOPInstanceUID = post_uid, generate_uid()
        c.file_meta.MediaStorageSOPInstanceUID = c.SOPInstanceUID
        c.SeriesNumber = 5
        c.ContrastBolusAgent = AGENT
        post.append(c)
    localizer = next(str(d.SeriesInstanceUID) for d in study.datasets
                     if d.SeriesDescription == "LOCALIZER")
    return [*study.datasets, *post], str(flair[0].SeriesInstanceUID), post_uid, localizer


def flair_rule(**extra: object) -> SelectionRule:
    return SelectionRule(modalities=("MR",), description_regex="FLAIR|T2",
                         exclude_regex="LOCALI[SZ]ER", orientation="axial", min_slices=20,
                         **extra)  # type: ignore[arg-type]


def test_a_condition_rejects_the_post_contrast_series_without_quoting_its_value() -> None:
    datasets, pre, post, localizer = with_post_contrast(1601)
    rule = flair_rule(when=parse_condition(
        {"not": {"tag": "ContrastBolusAgent", "exists": True}}, "test", "when"))
    assert rule.tags == frozenset({"ContrastBolusAgent"})
    sel = select_series(describe_series(datasets, rule.tags), rule)
    assert [s.series_uid for s in sel.chosen] == [pre]
    considered = {uid: (chosen, why) for uid, chosen, why in sel.considered}
    assert set(considered) == {pre, post, localizer}  # every series, chosen or not
    assert considered[pre] == (True, "matched every selection rule")
    assert considered[post] == (False, "selection condition not met: not "
                                       "(ContrastBolusAgent present)")
    assert considered[localizer][0] is False
    assert not any("GADOVIST" in why for _, why in considered.values())
    # the other operators: values never quoted, the rule's operand and keyword are
    only_post = flair_rule(when=parse_condition(
        {"all": [{"tag": "ContrastBolusAgent", "regex": "(?i)gado"},
                 {"tag": "SeriesNumber", "range": {"min": 4}}]}, "test", "when"))
    sel = select_series(describe_series(datasets, only_post.tags), only_post)
    assert [s.series_uid for s in sel.chosen] == [post]
    pre_why = dict(sel.rejected)[pre]
    assert pre_why == "selection condition not met: ContrastBolusAgent absent !~ /(?i)gado/"


def test_ties_are_broken_by_the_rule_the_file_names_and_say_which() -> None:
    datasets, pre, post, _ = with_post_contrast(1602)
    infos = describe_series(datasets)
    default = select_series(infos, flair_rule())  # the behaviour of files without one
    assert [s.series_uid for s in default.chosen] == [pre]
    why = dict(default.rejected)[post]
    assert why == (f"matched, but series {pre} ranks first by tie-break "
                   "lowest_series_number (the lowest SeriesNumber (0020,0011))")
    assert "40 > 40" not in why and "5" not in why.replace(pre, "")
    assert dict(default.chosen_reasons)[pre] == (
        "matched every selection rule; first of 2 matching series by tie-break "
        "most_slices, then lowest_series_number")
    latest = select_series(infos, flair_rule(tie_break=("highest_series_number",)))
    assert [s.series_uid for s in latest.chosen] == [post]
    tied = select_series(infos, flair_rule(tie_break=("most_slices",)))
    assert [s.series_uid for s in tied.chosen] == [pre]
    assert "tied with series" in dict(tied.rejected)[post]


def _bts_text(selection_extra: str) -> str:
    text = (REFERENCE_DIR / "bts.yaml").read_text()
    return text.replace("  max_spacing_mm: 6.0\n", f"  max_spacing_mm: 6.0\n{selection_extra}")


def test_pipeline_files_name_conditions_and_tie_breaks_and_bad_ones_say_where() -> None:
    where = REFERENCE_DIR / "bts.yaml"  # relative model paths resolve as for the real one
    ok = parse_pipeline(_bts_text(
        "  when: {not: {tag: ContrastBolusAgent, exists: true}}\n"
        "  tie_break: [finest_spacing, highest_series_number]\n"), where)
    rule = ok.spec.selection.rule()
    assert rule.when is not None and rule.tie_break == ("finest_spacing",
                                                        "highest_series_number")
    with pytest.raises(SpecError) as bad_tag:
        parse_pipeline(_bts_text("  when: {tag: NotATag, equals: X}\n"), where)
    line = _bts_text("").splitlines().index("  max_spacing_mm: 6.0") + 2
    assert f"bts.yaml:{line}: selection.when" in str(bad_tag.value)
    assert "unknown DICOM tag 'NotATag'" in str(bad_tag.value)
    with pytest.raises(SpecError) as bad_tie:
        parse_pipeline(_bts_text("  tie_break: [biggest]\n"), where)
    assert "selection.tie_break" in str(bad_tie.value)
    assert "unknown tie-break biggest" in str(bad_tie.value)


@pytest.mark.server
@pytest.mark.slow
async def test_a_failed_run_names_the_series_it_used(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    bts = reference["bts"]
    await bus.publish(deployed_event(bts, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(1603)
    datasets = list(study.datasets)
    flair = [d for d in datasets if d.SeriesDescription == "AX T2 FLAIR"]
    pre = str(flair[0].SeriesInstanceUID)
    localizer = next(str(d.SeriesInstanceUID) for d in datasets
                     if d.SeriesDescription == "LOCALIZER")
    datasets.remove(flair[20])  # a missing slice: load_volume fails, after selection
    async with RunningWorker(bus, EngineWorker({"bts": bts}, worker_config)):
        await feed_study(bus, datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        evs = await wait_for(bus, study.study_uid, has("engine.inference.failed"), 120)
    failed = next(e for e in evs if isinstance(e, InferenceFailed))
    assert failed.final and failed.operator == "load_volume"
    (selected,) = [e for e in evs if isinstance(e, SeriesSelected)]
    assert selected.run_key == failed.run_key and selected.attempt == failed.attempt
    by_uid = {s.series_uid: s for s in selected.series}
    assert set(by_uid) == {pre, localizer}  # every series of the study
    assert by_uid[pre].chosen and by_uid[pre].reason == "matched every selection rule"
    assert not by_uid[localizer].chosen
    assert by_uid[localizer].reason.startswith("SeriesDescription (0008,103E)")
    # `lastmile audit` shows every series and its reason in full
    from lastmile.cli import _summary

    assert _summary(selected).splitlines() == [
        f"chosen {pre}: matched every selection rule",
        f"rejected {localizer}: {by_uid[localizer].reason}"]
