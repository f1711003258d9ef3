"""XNAT settings and the `lastmile up` services, against the XNAT STAND-IN and a real
nats-server; plus what the stand-in itself must answer for the real client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
import xnat
import xnat.exceptions
from typer.testing import CliRunner

from events.jetstream import EventBus
from lastmile.cli_xnat import xnat_app
from lastmile.services_xnat import (
    XnatFeedbackService,
    XnatPublisherService,
    XnatSettings,
    xnat_services,
)
from lastmile.settings import ConfigError, Settings
from tests.xnat.conftest import PASSWORD, USER, StudyResult, of_type, wait_for
from tests.xnat.standin import XnatStandIn


def test_settings_from_environment_and_secrets_stay_hidden() -> None:
    s = XnatSettings.from_env({"LASTMILE_XNAT_URL": "https://xnat.example.org",
                               "LASTMILE_XNAT_USER": "svc", "LASTMILE_XNAT_PASSWORD": "s3cr3t",
                               "LASTMILE_XNAT_POLL_S": "15", "LASTMILE_XNAT_VERIFY": "false"})
    assert s.enabled and s.poll_s == 15 and not s.verify and s.project == "LASTMILE"
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in repr(s.access())
    assert "s3cr3t" not in repr(s.access())
    assert not XnatSettings.from_env({}).enabled
    with pytest.raises(ConfigError, match="LASTMILE_XNAT_URL"):
        XnatSettings.from_env({"LASTMILE_XNAT_URL": "xnat.example.org"})
    with pytest.raises(ConfigError, match="LASTMILE_XNAT_POLL_S"):
        XnatSettings.from_env({"LASTMILE_XNAT_URL": "http://x", "LASTMILE_XNAT_POLL_S": "soon"})


def test_no_xnat_url_means_no_xnat_services(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert xnat_services(settings, XnatSettings()) == []
    kinds = {type(s) for s in xnat_services(settings, XnatSettings(url="http://x"))}
    assert kinds == {XnatPublisherService, XnatFeedbackService}


def test_netrc_credentials_are_used(standin: XnatStandIn, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {standin.host}:{standin.port} login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    s = XnatSettings(url=standin.url, netrc_file=str(netrc))
    from engine.xnat_publisher import XnatConnection

    connection = XnatConnection(s.access())
    try:
        assert connection.call(lambda session: session.logged_in_user) == USER
    finally:
        connection.close()


def test_check_command(standin: XnatStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LASTMILE_XNAT_URL", standin.url)
    monkeypatch.setenv("LASTMILE_XNAT_USER", USER)
    monkeypatch.setenv("LASTMILE_XNAT_PASSWORD", PASSWORD)
    root = typer.Typer()  # as the integrator registers it: app.add_typer(xnat_app, name="xnat")
    root.add_typer(xnat_app, name="xnat")
    root.command("noop")(lambda: None)
    result = CliRunner().invoke(root, ["xnat", "check", "--json"])
    assert result.exit_code == 0, result.output
    assert '"version": "1.8.10"' in result.output and PASSWORD not in result.output
    monkeypatch.setenv("LASTMILE_XNAT_PASSWORD", "wrong")
    result = CliRunner().invoke(root, ["xnat", "check"])
    assert result.exit_code == 3 and "refused the credentials" in result.output


@pytest.mark.server  # a real nats-server
async def test_services_publish_and_pull_feedback(bus: EventBus, standin: XnatStandIn,
                                                  study_result: StudyResult,
                                                  tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)  # the fixture laid results/ and instances/ there
    assert settings.results_dir == study_result.results_dir
    assert settings.instances_dir == study_result.instances_dir
    xs = XnatSettings(url=standin.url, project="LMUP", user=USER, password=PASSWORD,
                      timeout_s=5.0, poll_s=0.2, backoff_s=0.05)
    await bus.publish_many(study_result.events())
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(bus, stop)) for s in xnat_services(settings, xs)]
    try:
        await wait_for(bus, study_result.study_uid,
                       lambda evs: len(of_type(evs, "engine.result.published")) >= 2)
        session = next(iter(standin.experiments.values()))
        with xnat.connect(standin.url, user="dr_reader", password="reader-pw",
                          loglevel="ERROR") as clinician:
            clinician.experiments[session.id].mset({
                "fields/field[name=lm_review_reader]/field": "dr_reader",
                "fields/field[name=lm_review_agree_lesion]/field": "yes",
                "fields/field[name=lm_review_submitted_at]/field": "2026-11-22T06:00:00Z"})
        events = await wait_for(bus, study_result.study_uid,
                                lambda evs: bool(of_type(evs, "review.review.submitted")))
        review = of_type(events, "review.review.submitted")[0]
        assert review.agree == {"lesion": True}  # type: ignore[attr-defined]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


# --------------------------------------------------------------------------- the stand-in


def test_standin_login_flow_matches_what_the_client_needs(standin: XnatStandIn) -> None:
    with xnat.connect(standin.url, user=USER, password=PASSWORD, loglevel="ERROR") as session:
        assert session.xnat_version == "1.8.10"
        assert session.logged_in_user == USER
        assert session.classes is not None  # the object model was built from the schemas
    paths = [(r.method, r.path) for r in standin.requests]
    assert ("PUT", "/data/services/auth") in paths
    assert ("GET", "/data/auth") in paths and ("GET", "/xapi/schemas/xnat") in paths
    assert ("DELETE", "/data/JSESSION") in paths
    with pytest.raises(xnat.exceptions.XNATLoginFailedError):
        xnat.connect(standin.url, user=USER, password="nope", loglevel="ERROR")


def test_standin_refuses_a_second_upload_without_overwrite(standin: XnatStandIn) -> None:
    standin.add_project("P1")
    with xnat.connect(standin.url, user=USER, password=PASSWORD, loglevel="ERROR") as session:
        subject = session.classes.SubjectData(parent=session.projects["P1"], label="s1")
        experiment = session.classes.MrSessionData(parent=subject, label="e1")
        resource = experiment.create_resource("R")
        resource.upload_data(b"one", "f.bin")
        with pytest.raises(xnat.exceptions.XNATUploadError, match="409"):
            resource.upload_data(b"two", "f.bin")
        resource.upload_data(b"two", "f.bin", overwrite=True)
        assert resource.files["f.bin"].digest == standin.experiments[
            experiment.id].resources["R"].files["f.bin"].md5
