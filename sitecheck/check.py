"""The site check: send each study of a folder, then watch the log until each outcome is
final or its deadline passes.

Studies are sent one after the other, one association each (as a modality or a PACS
forwards a worklist); each study is watched from the moment its association ended, by
reading that study's subject of the event log (``EventBus.history``), so the check costs
the log one small read per pending study and poll.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from events.jetstream import EventBus
from sitecheck.folder import Folder, Skipped
from sitecheck.outcome import PipelineOutcome, Result, StudyOutcome, fold
from sitecheck.sender import Peer, StudySent, send_study


@dataclass
class StudyReport:
    """One study: what was sent, what the log says, and whether the wait ran out."""

    sent: StudySent
    outcome: StudyOutcome
    timed_out: bool = False

    @property
    def study_uid(self) -> str:
        return self.sent.study_uid

    @property
    def crashed(self) -> bool:
        return self.outcome.crashed

    def results(self) -> list[Result]:
        if self.outcome.pipelines:
            return [Result.TIMED_OUT if self.timed_out and not p.result.final else p.result
                    for p in self.outcome.pipelines]
        if self.timed_out and not self.outcome.result.final:
            return [Result.TIMED_OUT]
        return [self.outcome.result]

    def as_dict(self) -> dict[str, Any]:
        o = self.outcome
        return {
            "study_uid": self.study_uid,
            "called_ae": self.sent.called_ae,
            "files": len(self.sent.files),
            "sent": self.sent.counts(),
            "association": self.sent.association,
            "association_note": self.sent.association_note,
            "send_started_at": self.sent.started_at.isoformat(),
            "send_s": round(self.sent.seconds, 3),
            "not_accepted": [{"path": f.path, "category": f.category,
                              "status": f.status, "status_name": f.status_name,
                              "note": f.note} for f in self.sent.files if not f.accepted],
            "converted": sum(1 for f in self.sent.files if f.accepted and f.note),
            "stored": o.stored,
            "duplicates": o.duplicates,
            "rejected": dict(o.rejected),
            "unrouted": sorted(set(o.unrouted)),
            "dead_letters": o.dead_letters,
            "replaced_across_series": o.replaced_across_series,
            "result": None if o.pipelines else self.results()[0].value,
            "reason": o.reason,
            "pipelines": [_pipeline_dict(p, self.sent, self.timed_out) for p in o.pipelines],
            "crashed": self.crashed,
            "timed_out": self.timed_out,
            "retried_runs": o.retried_runs,
        }


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier).total_seconds(), 3)


def _pipeline_dict(p: PipelineOutcome, sent: StudySent, timed_out: bool) -> dict[str, Any]:
    result = Result.TIMED_OUT if timed_out and not p.result.final else p.result
    latest = max(p.runs, key=lambda r: r.first_sequence) if p.runs else None
    return {
        "pipeline": p.pipeline,
        "result": result.value,
        "reason": p.reason,
        "completed_reason": p.completed_reason,
        "completed_at": p.completed_at.isoformat() if p.completed_at else None,
        "result_at": p.result_at.isoformat() if p.result_at else None,
        "completed_after_send_s": _seconds(p.completed_at, sent.ended_at),
        "result_after_completed_s": _seconds(p.result_at, p.completed_at),
        "runs": len(p.runs),
        "superseded_runs": p.superseded_runs,
        "attempts": {r.run_key: r.starts for r in p.runs},
        "kinds": latest.kinds if latest else [],
        "result_keys": latest.result_keys if latest else [],
        "findings": latest.findings if latest else [],
    }


def settle(sent: StudySent, outcome: StudyOutcome) -> StudyOutcome:
    """A study that never reached the log is refused by the receiver, with the sender's
    reasons (association refused, no context, failure statuses), or crashed at the
    receiver when it ended the association without answering a C-STORE: no status and
    no event, the one ending a sender cannot act on."""
    if outcome.pipelines or outcome.result.final or any(f.accepted for f in sent.files):
        return outcome
    if sent.files and all(f.category == "Unreadable" for f in sent.files):
        outcome.result = Result.NOT_SENT
        outcome.reason = "; ".join(sorted({f.note or "" for f in sent.files}))
        return outcome
    unanswered = [f for f in sent.files if f.category == "Failure" and f.status is None]
    if unanswered and not outcome.rejected:
        outcome.result = Result.CRASHED
        outcome.reason = (f"no answer to {len(unanswered)} C-STORE request(s) (the "
                          f"association was aborted or the receiver did not answer in time) "
                          f"and no event recorded")
        return outcome
    reasons = sorted({f.note or f.status_name for f in sent.files})
    outcome.result = Result.REFUSED
    outcome.reason = "; ".join(reasons) or "nothing was sent"
    return outcome


@dataclass
class CheckReport:
    """The whole check: per study, plus the files that were not DICOM instances."""

    studies: list[StudyReport] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """False when a study crashed or timed out (the command's exit code)."""
        return not any(s.crashed or s.timed_out for s in self.studies)

    def summary(self) -> dict[str, Any]:
        results: dict[str, int] = {}
        refusals: dict[str, int] = {}
        for s in self.studies:
            for r in s.results():
                results[r.value] = results.get(r.value, 0) + 1
            for p in s.outcome.pipelines:
                if p.result is Result.REFUSED:
                    key = _reason_kind(p.reason)
                    refusals[key] = refusals.get(key, 0) + 1
            if not s.outcome.pipelines and s.outcome.result is Result.REFUSED:
                key = _reason_kind(s.outcome.reason)
                refusals[key] = refusals.get(key, 0) + 1
        return {
            "studies": len(self.studies),
            "files": sum(len(s.sent.files) for s in self.studies),
            "skipped_files": len(self.skipped),
            "results": results,
            "refusals": refusals,
            "retried_runs": sum(s.outcome.retried_runs for s in self.studies),
            "crashed": sum(1 for s in self.studies if s.crashed),
            "timed_out": sum(1 for s in self.studies if s.timed_out),
            "seconds": round(self.seconds, 1),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "studies": [s.as_dict() for s in self.studies],
            "skipped_files": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
        }


_UID = re.compile(r"\b\d+(?:\.\d+){2,}\b")


def _reason_kind(reason: str | None, limit: int = 90) -> str:
    """A refusal reason without the UIDs and paths that make each one unique."""
    text = (reason or "no reason given").split(" (")[0]
    text = _UID.sub("<uid>", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _outcome(bus: EventBus, sent: StudySent) -> StudyOutcome:
    return settle(sent, fold(sent.study_uid, await bus.history(sent.study_uid)))


async def run_check(
    bus: EventBus,
    folder: Folder,
    peer: Peer,
    *,
    timeout_s: float = 960.0,
    poll_s: float = 1.0,
    on_event: Callable[[str, StudyReport], None] | None = None,
) -> CheckReport:
    """Send every study of ``folder`` to ``peer`` and wait for each one's outcome.

    ``timeout_s`` counts from the end of each study's association; a study still not
    final then is reported as timed out. ``on_event("sent" | "done", report)`` lets a
    caller show progress.
    """
    t0 = time.perf_counter()
    report = CheckReport(skipped=list(folder.skipped))
    pending: dict[str, tuple[StudyReport, float]] = {}
    sending_done = asyncio.Event()

    async def send_all() -> None:
        try:
            for files in folder.studies.values():
                sent = await asyncio.to_thread(send_study, files, peer)
                study = StudyReport(sent, StudyOutcome(sent.study_uid))
                report.studies.append(study)
                pending[sent.study_uid] = (study, time.monotonic() + timeout_s)
                if on_event:
                    on_event("sent", study)
        finally:
            sending_done.set()

    sender = asyncio.create_task(send_all())
    try:
        while not (sending_done.is_set() and not pending):
            for uid, (study, deadline) in list(pending.items()):
                study.outcome = await _outcome(bus, study.sent)
                if study.outcome.final or time.monotonic() > deadline:
                    study.timed_out = not study.outcome.final
                    del pending[uid]
                    if on_event:
                        on_event("done", study)
            if pending or not sending_done.is_set():
                await asyncio.sleep(poll_s)
        await sender  # re-raise what the sender raised, if anything
    finally:
        if not sender.done():
            sender.cancel()
    report.seconds = time.perf_counter() - t0
    return report
