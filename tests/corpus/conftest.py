"""The corpus run: one real ``lastmile up`` and one ``lastmile check`` per called AE over
the whole corpus; every case's test then reads its own studies from the result.

The corpus is built once into the download cache (``tests/corpus/sources.py``), keyed by
the builder's own source, so a changed case list builds afresh. ``LASTMILE_CORPUS=full``
runs the whole corpus instead of the CI sample (``build.SAMPLE`` says what the sample
cuts). At the end the session prints the table of every case and writes
``test-artifacts/corpus.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from events.nats_server import free_port
from sitecheck.folder import scan
from tests.corpus import build, sources
from tests.drills.procs import LASTMILE, clean_env, lastmile_up

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
ARTIFACT = ROOT / "test-artifacts" / "corpus.json"
CHECK_TIMEOUT_S = 240  # per study, after its association; the corpus rules wait <= 20 s


def full_corpus() -> bool:
    return os.environ.get("LASTMILE_CORPUS", "") == "full"


@dataclass
class CorpusRun:
    """What ``check`` said about each study, by case, and where the results are."""

    root: Path
    results_dir: Path
    by_case: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # per AE
    exit_codes: dict[str, int] = field(default_factory=dict)  # per AE
    resend_output: str = ""  # `check` (table form) re-sending a study already done
    seconds: float = 0.0
    verdicts: dict[str, str] = field(default_factory=dict)  # case -> PASS / FAIL: why


RUN: list[CorpusRun] = []


def corpus_root() -> Path:
    """The built corpus for this builder; builds of an older builder are removed."""
    key = hashlib.sha256(Path(build.__file__).read_bytes()).hexdigest()[:12]
    mode = "full" if full_corpus() else "sample"
    root = sources.cache_dir() / f"corpus-{mode}-{key}"
    for old in sources.cache_dir().glob(f"corpus-{mode}-*"):
        if old != root:
            shutil.rmtree(old, ignore_errors=True)
    return root


def _deploy(env: dict[str, str]) -> None:
    for name in ("bts", "lts", "hfd"):
        subprocess.run([*LASTMILE, "pipelines", "deploy", str(ROOT / "engine" / "pipelines" /
                                                             f"{name}.yaml"),
                        "--stage", "validation",
                        "--why", "the corpus test runs every pipeline on every routed study"],
                       env=env, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def corpus() -> Iterator[CorpusRun]:
    root = corpus_root()
    cases = build.build(root, full_corpus())
    # not pytest's numbered temp dirs: a concurrent pytest session on this machine may
    # prune those while this run's server still writes there
    state = Path(tempfile.mkdtemp(prefix="lastmile-corpus-"))
    try:
        yield _run(root, cases, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _run(root: Path, cases: list[build.Case], state: Path) -> CorpusRun:
    dicom_port = free_port()
    env = clean_env(state_dir=str(state), nats_port=str(free_port()),
                    dicom_port=str(dicom_port), nats_sync="2m",
                    services='["ingest", "engine"]', routing_rules=str(HERE / "rules.yaml"))
    _deploy(env)
    run = CorpusRun(root, state / "results")
    t0 = time.perf_counter()
    with lastmile_up(env, state / "up.log", wait_port=dicom_port):
        # one check per called AE, side by side (one association per study each), as
        # several modalities send at once; the one engine worker takes them in turn
        procs = {ae: subprocess.Popen(
            [*LASTMILE, "check", str(root / ae), "--ae", ae, "--json",
             "--timeout", str(CHECK_TIMEOUT_S)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
            for ae in sorted({c.ae for c in cases})}
        outputs = {ae: p.communicate(timeout=1200) for ae, p in procs.items()}
        control = next(c for c in cases if c.name == "phantom HFD control")
        resend = subprocess.run([*LASTMILE, "check", str(root / control.ae / control.folder),
                                 "--ae", control.ae, "--timeout", "60"], env=env,
                                capture_output=True, text=True, timeout=300)
        run.resend_output = f"exit {resend.returncode}\n{resend.stdout}"
    run.seconds = time.perf_counter() - t0
    studies: dict[str, dict[str, Any]] = {}
    for ae, (stdout, stderr) in outputs.items():
        if procs[ae].returncode not in (0, 1):
            raise RuntimeError(f"lastmile check {ae} exited {procs[ae].returncode}:\n"
                               f"{stderr[-3000:]}")
        try:
            report = json.loads(stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"lastmile check {ae} exited {procs[ae].returncode} without "
                               f"its report:\n{stderr[-3000:]}") from None
        run.summaries[ae] = report["summary"]
        run.exit_codes[ae] = procs[ae].returncode
        studies.update({s["study_uid"]: s for s in report["studies"]})
    for case in cases:
        found = scan(root / case.ae / case.folder)
        run.by_case[case.name] = [studies[u] for u in found.studies if u in studies]
        if not found.studies:  # nothing check could send: its reasons, as a study would
            run.by_case[case.name] = [{
                "study_uid": case.folder, "result": "not sent", "pipelines": [],
                "reason": "; ".join(sorted({s.reason for s in found.skipped})),
                "timed_out": False, "crashed": False, "retried_runs": 0, "dead_letters": []}]
    RUN.append(run)
    return run


def totals(run: CorpusRun) -> dict[str, Any]:
    """The README's corpus row: check's summaries added up over the called AEs."""
    out: dict[str, Any] = {"studies": 0, "files": 0, "skipped_files": 0, "results": {},
                           "refusals": {}, "retried_runs": 0, "crashed": 0, "timed_out": 0}
    for summary in run.summaries.values():
        for key in ("studies", "files", "skipped_files", "retried_runs", "crashed",
                    "timed_out"):
            out[key] += summary[key]
        for key in ("results", "refusals"):
            for name, n in summary[key].items():
                out[key][name] = out[key].get(name, 0) + n
    out["seconds"] = round(run.seconds, 1)
    return out


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not RUN:
        return
    run = RUN[0]
    tr = terminalreporter
    tr.section(f"corpus ({'full' if full_corpus() else 'sample'}): "
               f"{sum(len(v) for v in run.by_case.values())} studies in {run.seconds:.0f} s "
               f"(test-artifacts/corpus.json)")
    for name, studies in run.by_case.items():
        results = []
        for s in studies:
            if s["pipelines"]:
                results += [f"{p['pipeline']}: {p['result']}"
                            + (f" ({p['reason'][:110]})" if p["reason"] else "")
                            for p in s["pipelines"]]
            else:
                results.append(f"{s['result']}" + (f" ({(s['reason'] or '')[:110]})"))
        tr.write_line(f"{run.verdicts.get(name, '?'):5} {name}: {'; '.join(results)}")
    for ae, summary in run.summaries.items():
        tr.write_line(f"{ae}: {json.dumps(summary)}")
    total = totals(run)
    tr.write_line(f"all: {json.dumps(total)}")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps({"seconds": round(run.seconds, 1), "totals": total,
                                    "summaries": run.summaries, "verdicts": run.verdicts,
                                    "cases": run.by_case}, indent=1) + "\n")
