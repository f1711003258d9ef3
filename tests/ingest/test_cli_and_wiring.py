"""The command-line surface (route test, study complete) and the services `lastmile up` runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pydicom
import pytest
import typer
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from bench.ingest import ct_instances
from events.catalogue import CompletionReason, StudyCompleted
from events.jetstream import EventBus
from events.nats_server import free_port
from ingest.rules import EXAMPLE_RULES, load_rules
from lastmile.cli_route import route_app
from lastmile.cli_study import force_complete
from lastmile.services_ingest import CompletionService, ScpService, ingest_services
from lastmile.settings import Settings
from tests.ingest.conftest import SECRET, StartIngest, needs_dcmtk, storescu, wait_for_events

runner = CliRunner()


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(route_app, name="route")
    return app


def test_route_test_explains_which_rules_and_pipelines_match(tmp_path: Path) -> None:
    (ct,) = ct_instances(tmp_path / "ct", 1)
    result = runner.invoke(cli(), ["route", "test", str(ct), "--rules", str(EXAMPLE_RULES),
                                   "--json"])
    assert result.exit_code == 0, result.output
    (res,) = json.loads(result.output)["results"]
    assert res["pipelines"] == ["lts"] and res["matched_rules"] == ["ct-abdomen-lts"]
    why = {r["rule"]: r for r in res["rules"]}
    assert why["ct-abdomen-lts"]["matched"] and "Modality='CT'" in why["ct-abdomen-lts"]["why"]
    assert not why["mr-brain-bts"]["matched"]
    text = runner.invoke(cli(), ["route", "test", get_testdata_file("MR_small.dcm"),
                                 "--rules", str(EXAMPLE_RULES), "--called-ae", "LM_BTS"])
    assert text.exit_code == 0 and "bts" in text.output and "AE title LM_BTS" in text.output


def test_route_test_refuses_an_invalid_rules_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {id: x, pipelines: [bts], when: {tag: Modality, eq: MR}}\n")
    result = runner.invoke(cli(), ["route", "test", get_testdata_file("MR_small.dcm"),
                                   "--rules", str(bad)])
    assert result.exit_code == 3
    assert "bad.yaml:2" in result.output and "'eq'" in result.output


@pytest.mark.server
@needs_dcmtk
async def test_study_complete_forces_once(
        start_ingest: StartIngest, bus: EventBus, tmp_path: Path) -> None:
    waiting = "pipelines:\n  lts: {completion: {quiet_period_s: 600, release_grace_s: 600}}\n"
    r = await start_ingest(waiting)
    files = ct_instances(tmp_path / "s", 2)
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert (await storescu(r.port, files, called="LM_LTS"))[0] == 0
    await wait_for_events(bus, study, "ingest.instance.stored", 2)
    rules = load_rules(EXAMPLE_RULES)
    events, stored = await force_complete(bus, rules, study, None)
    assert stored == 2
    (forced,) = events
    assert isinstance(forced, StudyCompleted) and forced.reason is CompletionReason.FORCED
    assert forced.instance_count == 2 and forced.pipeline == "lts"
    again, _ = await force_complete(bus, rules, study, None)
    assert again == []
    await asyncio.sleep(0.5)  # the running detector folded it: it does not complete again
    done = [e for _, e in await bus.history(study) if isinstance(e, StudyCompleted)]
    assert len(done) == 1


@pytest.mark.server
@needs_dcmtk
async def test_services_for_lastmile_up_receive_and_complete(
        bus: EventBus, tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", dicom_port=free_port(),
                        site_secret=SECRET.decode(), dicom_min_free_mb=0)
    services = ingest_services(settings)
    assert [type(s) for s in services] == [ScpService, CompletionService]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(bus, stop)) for s in services]
    try:
        scp = services[0]
        assert isinstance(scp, ScpService)
        await asyncio.wait_for(scp.app.scp.started.wait(), 15)
        files = ct_instances(tmp_path / "ct", 3)
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        rc, out = await storescu(settings.dicom_port, files, called="LASTMILE")
        assert rc == 0, out
        (done,) = await wait_for_events(bus, study, "ingest.study.completed")
        assert done.pipeline == "lts"  # routed by the shipped example rules (CT abdomen)
        assert len(list(settings.instances_dir.glob("*/*.dcm"))) == 3
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


def test_an_invalid_rules_file_stops_up_with_a_configuration_error(tmp_path: Path) -> None:
    from lastmile.settings import ConfigError

    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - {id: x, pipelines: [bts], when: {tag: Modality, equal: MR}}\n")
    settings = Settings(state_dir=tmp_path / "state", routing_rules=bad,
                        site_secret=SECRET.decode())
    with pytest.raises(ConfigError, match="rules.yaml:2"):
        ingest_services(settings)
