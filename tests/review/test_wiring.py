"""The composition-root parts: `lastmile users`, `lastmile link`, `lastmile review
add-mask`, and the case-assignment service on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bench.review import write_user
from dashboards.config import ReviewConfig
from dashboards.review.auth import Role, authenticate, load_users
from events.base import Event
from events.catalogue import CaseAssigned, InferenceCompleted, QcPassed, UserChanged
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats
from lastmile.cli_review import link_command, review_app, users_app
from lastmile.services_review import CaseAssignmentService, deep_link
from lastmile.settings import load_settings


def cli(state: Path, nats_url: str | None = None) -> typer.Typer:
    """The sub-apps mounted as lastmile/cli.py mounts them, on a test state dir."""
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = load_settings(None, state_dir=state, nats_url=nats_url)

    app.add_typer(users_app, name="users")
    app.add_typer(review_app, name="review")
    app.command("link")(link_command)
    return app


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LASTMILE_USERS_FILE", "LASTMILE_XNAT_URL", "LASTMILE_PUBLIC_URL",
                "LASTMILE_DASHBOARD_STATE_DIR", "LASTMILE_STATE_DIR"):
        monkeypatch.delenv(key, raising=False)


def test_users_add_stores_a_hash_in_a_private_file_and_list_hides_it(
        tmp_path: Path, clean_env: None, fresh_server: EmbeddedNats) -> None:
    fresh_server.start()
    runner = CliRunner()
    app = cli(tmp_path, fresh_server.url)
    r = runner.invoke(app, ["users", "add", "dr.a", "--role", "reader", "--role", "qc",
                            "--pipeline", "hfd", "--password-stdin"],
                      input="pw one two three four\n")
    assert r.exit_code == 0, r.output
    path = tmp_path / "users.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "pw one two three four" not in path.read_text()
    users = load_users(path)
    user = authenticate(users, "dr.a", "pw one two three four")
    assert user is not None and user.roles == {Role.READER, Role.QC}
    assert user.pipelines == ("hfd",)
    r = runner.invoke(app, ["users", "list"])
    assert r.exit_code == 0 and "dr.a" in r.output and "scrypt" not in r.output
    bad = runner.invoke(app, ["users", "add", "x", "--role", "wizard", "--password-stdin"],
                        input="p\n")
    assert bad.exit_code == 2 and "unknown role" in bad.output
    # who changed it is recorded (the OS account running the command), not the password
    pw = tmp_path / "dr.a.pw"
    pw.write_text("pw one two three four\n")
    pw.chmod(0o600)
    r = runner.invoke(app, ["users", "add", "dr.b", "--role", "reader", "--as", "dr.a",
                            "--password-file", str(pw), "--password-stdin"], input="pw\n")
    assert r.exit_code == 1 and "the governance or admin role is needed" in r.output

    async def log() -> list[Event]:
        bus = await EventBus.connect(BusSettings(servers=(fresh_server.url,)))
        try:
            return [e async for _, e, _ in bus.read() if isinstance(e, Event)]
        finally:
            await bus.close()

    events = asyncio.run(log())
    assert [(e.type, e.actor.split(":")[0]) for e in events] == [
        ("access.user.changed", "os"), ("access.sign_in.failed", "os")]
    assert isinstance(events[0], UserChanged) and events[0].user == "dr.a"
    assert events[0].change == "added" and events[0].roles == ("qc", "reader")


def test_users_add_refuses_a_weak_password_and_remove_disable_change_the_file(
        tmp_path: Path, clean_env: None, fresh_server: EmbeddedNats) -> None:
    fresh_server.start()
    runner = CliRunner()
    app = cli(tmp_path, fresh_server.url)
    path = tmp_path / "users.toml"
    for weak, why in (("secret", "too short"), ("password1234", "too weak")):
        r = runner.invoke(app, ["users", "add", "dr.b", "--role", "reader", "--password-stdin"],
                          input=f"{weak}\n")
        assert r.exit_code == 2 and why in r.output, r.output
    assert not path.exists()  # nothing written
    for name in ("dr.b", "dr.c"):
        r = runner.invoke(app, ["users", "add", name, "--role", "reader", "--password-stdin"],
                          input="cobalt lantern ferry quartz\n")
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["users", "disable", "dr.b"])
    assert r.exit_code == 0
    users = load_users(path)
    assert users.get("dr.b").disabled  # type: ignore[union-attr]
    assert authenticate(users, "dr.b", "cobalt lantern ferry quartz") is None
    assert "disabled" in runner.invoke(app, ["users", "list"]).output
    assert runner.invoke(app, ["users", "enable", "dr.b"]).exit_code == 0
    assert authenticate(load_users(path), "dr.b", "cobalt lantern ferry quartz") is not None
    r = runner.invoke(app, ["users", "remove", "dr.c"])
    assert r.exit_code == 0 and load_users(path).get("dr.c") is None
    assert runner.invoke(app, ["users", "remove", "nobody"]).exit_code == 5
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.server
def test_link_points_to_our_case_page_or_the_xnat_session(
        tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch,
        fresh_server: EmbeddedNats) -> None:
    async def publish() -> None:
        bus = await EventBus.connect(BusSettings(servers=(fresh_server.url,)))
        try:
            await bus.publish(QcPassed.new(actor="qc", study_uid="1.2.840.1", pipeline="hfd",
                                           run_key="r"))
        finally:
            await bus.close()

    fresh_server.start()
    asyncio.run(publish())
    runner = CliRunner()
    app = cli(tmp_path, fresh_server.url)
    r = runner.invoke(app, ["link", "1.2.840.1"])
    assert r.exit_code == 0 and r.output.strip() == "http://127.0.0.1:8501/case?study=1.2.840.1"
    # a study the log does not know: nothing found, as `lastmile audit` says it
    r = runner.invoke(app, ["link", "1.2.840.404"])
    assert r.exit_code == 5 and "no events for study 1.2.840.404" in r.output
    monkeypatch.setenv("LASTMILE_PUBLIC_URL", "https://lastmile.example.org/")
    r = runner.invoke(cli(tmp_path, fresh_server.url), ["link", "1.2.840.1"])
    assert r.output.strip() == "https://lastmile.example.org/case?study=1.2.840.1"
    from engine.xnat_publisher import session_label

    cfg = ReviewConfig(tmp_path, tmp_path / "u.toml", xnat_url="https://xnat.example.org",
                       xnat_project="LM")
    assert deep_link(cfg, "1.2.840.1") == (
        "https://xnat.example.org/data/projects/LM/experiments/"
        f"{session_label('1.2.840.1')}?format=html")
    assert deep_link(cfg, "1.2.840.1", ours=True).endswith("/case?study=1.2.840.1")


@pytest.mark.server
async def test_assignment_service_assigns_readers_once_after_qc_for_hfd(
        bus: EventBus, tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    write_user(users, "dr.a", "pw", ["reader"], ["hfd", "bts"])
    write_user(users, "dr.b", "pw", ["reader"], ["bts"])
    write_user(users, "qc.1", "pw", ["qc"], ["hfd"])
    service = CaseAssignmentService(ReviewConfig(tmp_path, users))

    def completed(study: str, pipeline: str) -> InferenceCompleted:
        return InferenceCompleted.new(actor="w", study_uid=study, pipeline=pipeline,
                                      run_key=f"run-{study}", model_name="m",
                                      model_version="1", runtime="cpu", runtime_reason="t",
                                      duration_s=1, inference_s=1)

    bts, hfd = completed("1.1", "bts"), completed("1.2", "hfd")
    for ev in (bts, hfd, bts):  # a re-published result changes nothing
        await bus.publish(ev)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(bus, stop))

    async def assigned(study: str, n: int) -> list[CaseAssigned]:
        for _ in range(100):
            got = [e for _, e in await bus.history(study) if isinstance(e, CaseAssigned)]
            if len(got) >= n:
                return got
            await asyncio.sleep(0.1)
        return got

    try:
        got = await assigned("1.1", 2)
        assert sorted(a.reader for a in got) == ["dr.a", "dr.b"]
        assert await assigned("1.2", 1) == []  # HFD waits for QC
        await bus.publish(hfd.caused(QcPassed, actor="qc.1", run_key=hfd.run_key))
        got = await assigned("1.2", 1)
        assert [a.reader for a in got] == ["dr.a"] and got[0].run_key == hfd.run_key
        await asyncio.sleep(0.5)
        assert len(await assigned("1.1", 2)) == 2  # once each
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.server
def test_unblinding_key_is_written_from_the_log_with_the_study_salt(
        tmp_path: Path, clean_env: None, fresh_server: EmbeddedNats,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboards.review.policy import blinded_label

    async def publish() -> None:
        bus = await EventBus.connect(BusSettings(servers=(fresh_server.url,)))
        try:
            for study, pipeline in (("1.5", "lts"), ("1.6", "lts"), ("1.7", "bts")):
                await bus.publish(InferenceCompleted.new(
                    actor="w", study_uid=study, pipeline=pipeline, run_key=f"run-{study}",
                    model_name="m", model_version="1", runtime="cpu", runtime_reason="t",
                    duration_s=1, inference_s=1))
        finally:
            await bus.close()

    fresh_server.start()
    asyncio.run(publish())
    salt = "the-study-office-salt-1"
    study_file = tmp_path / "blinded.toml"
    study_file.write_text(f'salt = "{salt}"\nsources = ["ai", "expert"]\n')
    study_file.chmod(0o600)  # it holds the salt: a readable file is refused
    out = tmp_path / "key.json"
    runner = CliRunner()
    app = cli(tmp_path / "state", fresh_server.url)
    r = runner.invoke(app, ["review", "unblinding-key", "--out", str(out)])
    assert r.exit_code == 3 and "LASTMILE_BLINDED_STUDY" in r.output
    monkeypatch.setenv("LASTMILE_BLINDED_STUDY", str(study_file))
    r = runner.invoke(app, ["review", "unblinding-key", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = json.loads(out.read_text())
    assert key == {blinded_label(salt.encode(), s, src): src
                   for s in ("1.5", "1.6") for src in ("ai", "expert")}
