"""Every study of the corpus ends in a valid result or a final named refusal (issue 14):
no crash, no timeout, no input error retried (``inference started`` counted per run
key), and every SEG/SR written is ``dciodvfy``-clean.

Cases that fail today for a known reason are marked ``xfail(strict=True)`` with that
reason, named after the kind of issue 14 and who fixes it; a fix turns the mark into an
XPASS failure, so the mark must then go.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _pytest.mark.structures import ParameterSet

from tests.corpus import build
from tests.corpus.conftest import CorpusRun, full_corpus

# the first case builds the corpus and runs it (the session fixture), the others read it
pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.corpus, pytest.mark.timeout(1500)]

#: case -> why it fails today (the kind of issue 14, and who fixes it)
KNOWN: dict[str, str] = {}


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines for one file (Debian dicom3tools)."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


def problems(case: build.Case, run: CorpusRun) -> list[str]:
    """Everything wrong with one case's studies (empty: the case passes)."""
    studies = run.by_case.get(case.name, [])
    if not studies:
        return ["no study of this case in check's report"]
    found = []
    for s in studies:
        uid = s["study_uid"][-12:]
        if s["timed_out"]:
            found.append(f"…{uid}: timed out")
        if s["crashed"]:
            found.append(f"…{uid}: crashed ({'; '.join(s['dead_letters'])[:300]})")
        if s.get("replaced_across_series"):
            found.append(f"…{uid}: {s['replaced_across_series']} instance(s) stored over an "
                         f"object of another series with the same SOP Instance UID")
        if s["retried_runs"]:
            found.append(f"…{uid}: {s['retried_runs']} run(s) started more than once")
        rows = s["pipelines"] or [{"pipeline": None, "result": s["result"],
                                   "reason": s["reason"], "result_keys": []}]
        for p in rows:
            if p["result"] not in case.expect:
                found.append(f"…{uid} {p['pipeline'] or ''}: {p['result']} "
                             f"({(p['reason'] or '')[:300]}), expected "
                             f"{' or '.join(sorted(case.expect))}")
            if p["result"] in ("refused", "not sent") and not p["reason"]:
                found.append(f"…{uid}: {p['result']} without a reason")
            if (case.reason_contains and p["result"] == "refused"
                    and case.reason_contains not in (p["reason"] or "").lower()):
                found.append(f"…{uid}: the refusal does not say {case.reason_contains!r}: "
                             f"{(p['reason'] or '')[:200]}")
            for key in p["result_keys"]:
                errors = dciodvfy_errors(run.results_dir / key)
                if errors:
                    found.append(f"…{uid}: {key.split('/')[-1][:4]} not dciodvfy-clean: "
                                 f"{errors[0][:200]}")
    if case.same_findings_as:
        control = run.by_case.get(case.same_findings_as, [])
        mine = [p["findings"] for s in studies for p in s["pipelines"] if p["findings"]]
        theirs = [p["findings"] for s in control for p in s["pipelines"] if p["findings"]]
        if mine and theirs and mine != theirs:
            found.append(f"findings {mine} differ from {case.same_findings_as}'s {theirs}")
    return found


def _params() -> list[ParameterSet]:
    out = []
    for case in build.cases(full_corpus()):
        # raises=AssertionError: a corpus run that breaks (a fixture error) is an error,
        # never an expected failure
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError,
                                   reason=KNOWN[case.name])] if case.name in KNOWN else []
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
def test_case_ends_valid_or_refused(case: build.Case, corpus: CorpusRun) -> None:
    found = problems(case, corpus)
    corpus.verdicts[case.name] = "FAIL" if found else "PASS"
    assert not found, f"{case.name} ({case.kind}, sent to {case.ae}):\n  " + "\n  ".join(found)


def test_check_exits_1_exactly_when_a_study_crashed_or_timed_out(corpus: CorpusRun) -> None:
    assert corpus.exit_codes, "no check ran"
    for ae, summary in corpus.summaries.items():
        bad = summary["crashed"] + summary["timed_out"]
        assert corpus.exit_codes[ae] == (1 if bad else 0), (ae, summary)


def test_check_resending_a_finished_study_reports_its_result_as_a_table(
        corpus: CorpusRun) -> None:
    """A site re-running check on studies already sent: the instances are duplicates, the
    outcome is the one already in the log, at once."""
    text = corpus.resend_output
    assert text.startswith("exit 0"), text
    assert "1 study," in text and "1 valid" in text and "0 crashed, 0 timed out" in text

