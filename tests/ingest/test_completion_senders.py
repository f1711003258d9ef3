"""Completion with the senders of the field, for real: dcmtk's storescu once per file
(one association per image, with and without pauses), a pynetdicom sender that aborts
after N instances and then re-sends the study, and a `lastmile up` killed with SIGKILL in
the middle of a study, restarted, and sent the study again. Each study must complete
exactly once, with every instance, on the evidence it recorded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from bench.ingest import ct_instances
from events.base import Event
from events.catalogue import (
    AssociationAborted,
    AssociationOpened,
    AssociationReleased,
    CompletionReason,
    StudyAmended,
    StudyCompleted,
)
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from events.subjects import type_filter
from tests.drills.procs import clean_env, lastmile_up
from tests.ingest.conftest import StartIngest, needs_dcmtk, storescu, wait_for_events

pytestmark = [pytest.mark.server, needs_dcmtk]

QUIET_S = 8.0  # well above the 2-3 s pauses plus a slow storescu start on a loaded machine
RULES = f"pipelines:\n  lts: {{completion: {{quiet_period_s: {QUIET_S:g}, max_wait_s: 120}}}}\n"


def _uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def _completions(history: list[Event]) -> list[StudyCompleted]:
    return [e for e in history if isinstance(e, StudyCompleted)]


async def _history(bus: EventBus, study: str) -> list[Event]:
    return [e for _, e in await bus.history(study)]


@pytest.mark.parametrize("pause_s", [0.0, 2.5], ids=["split", "paused"])
async def test_one_association_per_image_completes_once_with_every_instance(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path, pause_s: float) -> None:
    r = await start_ingest(RULES)
    files = ct_instances(tmp_path / "study", 4 if pause_s else 8, seed=3)
    study = _uid(files[0])
    for f in files:  # storescu per file: a new association for every image
        rc, out = await storescu(r.port, [f], called="LM_LTS")
        assert rc == 0, out
        assert not _completions(await _history(bus, study)), "completed on one image"
        await asyncio.sleep(pause_s)
    (done,) = await wait_for_events(bus, study, "ingest.study.completed", timeout=30)
    assert isinstance(done, StudyCompleted)
    assert done.instance_count == len(files) and not done.partial
    assert done.reason is CompletionReason.QUIET_PERIOD
    await asyncio.sleep(QUIET_S + 0.5)  # one quiet period more: no amendment, no second one
    history = await _history(bus, study)
    assert len(_completions(history)) == 1
    assert not [e for e in history if isinstance(e, StudyAmended)]
    released = [e for e in history if isinstance(e, AssociationReleased)]
    assert len(released) == len(files) and {e.instance_count for e in released} == {1}


def _stored(assoc: object, path: Path) -> bool:
    """C-STORE one file; True on Success (no response at all counts as a failure)."""
    status = assoc.send_c_store(pydicom.dcmread(path))  # type: ignore[attr-defined]
    return int(getattr(status, "Status", -1)) == 0


def send_and_abort(port: int, files: list[Path], after: int) -> int:
    """A sender that stores ``after`` instances and then aborts (A-ABORT)."""
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LM_LTS")
    assert assoc.is_established
    ok = sum(_stored(assoc, f) for f in files[:after])
    assoc.abort()
    return ok


async def test_aborted_after_n_is_held_until_the_resend_and_completes_once(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    r = await start_ingest(RULES)
    files = ct_instances(tmp_path / "study", 12, seed=4)
    study = _uid(files[0])
    assert await asyncio.to_thread(send_and_abort, r.port, files, 7) == 7
    (abort,) = await wait_for_events(bus, study, "ingest.association.aborted")
    assert isinstance(abort, AssociationAborted)
    assert (abort.aborted_by, abort.instance_count) == ("requestor", 7)
    await asyncio.sleep(QUIET_S + 1.5)  # longer than the quiet period: still held
    assert not _completions(await _history(bus, study))
    rc, out = await storescu(r.port, files, called="LM_LTS")  # the sender's full resend
    assert rc == 0, out
    (done,) = await wait_for_events(bus, study, "ingest.study.completed", timeout=10)
    assert isinstance(done, StudyCompleted)
    assert done.reason is CompletionReason.WHOLE_STUDY_RELEASED
    assert done.instance_count == 12 and not done.partial
    assert done.latency_s < 2.0
    await asyncio.sleep(QUIET_S + 0.5)
    assert len(_completions(await _history(bus, study))) == 1


def send_and_hang(port: int, files: list[Path], after: int, sent: list[int]) -> None:
    """A sender that stores ``after`` instances and keeps the association open (until
    the receiver dies under it)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="LM_LTS")
    for f in files[:after]:
        if _stored(assoc, f):
            sent.append(1)
    deadline = time.monotonic() + 30
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_kill_9_of_lastmile_up_mid_study_then_the_resend_completes_it_once(
        tmp_path: Path) -> None:
    """62 of 300 slices went to readers after a crash: here the downtime is longer than
    the quiet period, and nothing completes at the restart; the resend completes it."""
    files = ct_instances(tmp_path / "study", 16, seed=5)
    study = _uid(files[0])
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    state, dicom_port = tmp_path / "state", free_port()
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), sync="always").start()
    env = clean_env(state_dir=str(state), nats_url=server.url, dicom_port=str(dicom_port),
                    services='["ingest"]', dicom_min_free_mb="0", routing_rules=str(rules))
    bus = await EventBus.connect(BusSettings(servers=(server.url,)))
    try:
        sent: list[int] = []
        with lastmile_up(env, tmp_path / "up1.log", wait_port=dicom_port) as proc:
            sender = asyncio.create_task(
                asyncio.to_thread(send_and_hang, dicom_port, files, 6, sent))
            deadline = time.monotonic() + 30
            while len(sent) < 6:
                assert time.monotonic() < deadline, "the first instances were not stored"
                await asyncio.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # the whole service, mid-association
            proc.wait(10)
            await asyncio.wait_for(sender, 40)
        opened = [e async for _, e, _ in bus.read(filter_subject=type_filter(
            "ingest.association.opened")) if isinstance(e, AssociationOpened)]
        assert [(e.calling_ae, e.called_ae) for e in opened] == [("MODALITY", "LM_LTS")]
        await asyncio.sleep(QUIET_S + 2)  # down for longer than the quiet period
        with lastmile_up(env, tmp_path / "up2.log", wait_port=dicom_port):
            await asyncio.sleep(2.5)  # up again: 2.5 s of up-time is no quiet period
            history = await _history(bus, study)
            assert not _completions(history), "downtime counted as quiet time"
            assert not [e for e in history if isinstance(e, AssociationReleased)]
            rc = await asyncio.to_thread(subprocess.run, [
                "storescu", "-aet", "MODALITY", "-aec", "LM_LTS", "127.0.0.1",
                str(dicom_port), *map(str, files)], capture_output=True, timeout=60,
                env={**os.environ, "TCP_NODELAY": "1"})
            assert rc.returncode == 0, rc.stdout[-2000:]
            deadline = time.monotonic() + 15
            while not _completions(history := await _history(bus, study)):
                assert time.monotonic() < deadline, "the resent study did not complete"
                await asyncio.sleep(0.2)
            await asyncio.sleep(QUIET_S + 0.5)
            history = await _history(bus, study)
    finally:
        await bus.close()
        server.stop()
    (done,) = _completions(history)
    assert done.instance_count == 16 and not done.partial
    assert done.reason is CompletionReason.WHOLE_STUDY_RELEASED
    assert not [e for e in history if isinstance(e, StudyAmended)]
    uptime = state / "completion-uptime.json"
    assert len(json.loads(uptime.read_text())["intervals"]) == 2  # two runs of the service


@pytest.mark.slow
async def test_the_bench_reports_one_current_result_equal_to_the_single_association_one(
) -> None:
    """`lastmile bench ingest`'s sender outcomes, on two of its senders."""
    from bench.completion import run_completion_bench

    result = await run_completion_bench(("single", "aborted-resent"))
    single, aborted = result.outcomes
    assert (single.completions, single.results, single.current_results) == (1, 1, 1)
    assert single.reason == "whole_study_released" and single.equal_to_single
    assert single.last_instance_to_completed_s is not None
    assert single.last_instance_to_completed_s < 2.0
    assert (aborted.completions, aborted.current_results, aborted.amendments) == (1, 1, 0)
    assert aborted.equal_to_single is True and aborted.partial is False
