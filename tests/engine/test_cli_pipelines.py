"""`lastmile pipelines list|deploy|stage|retire` against a real nats-server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from engine.spec import REFERENCE_DIR
from events.nats_server import EmbeddedNats
from lastmile.cli_pipelines import pipelines_app
from lastmile.settings import Settings

pytestmark = [pytest.mark.server]


def _app(settings: Settings) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = settings

    app.add_typer(pipelines_app, name="pipelines")
    return app


def _users(state: Path) -> Path:
    """A users file with a governance member and a reader; their password files (0600)."""
    from dashboards.review.auth import User, Users, hash_password, parse_roles, save_users

    save_users(state / "users.toml", Users({
        "dr.board": User("dr.board", parse_roles(["governance"]), (),
                         hash_password("board pass 1")),
        "dr.read": User("dr.read", parse_roles(["reader"]), (), hash_password("read pass 1")),
    }))
    for name, pw in (("board.pw", "board pass 1"), ("wrong.pw", "not it"),
                     ("read.pw", "read pass 1")):
        (state / name).write_text(pw + "\n")
        (state / name).chmod(0o600)
    return state


def _log(settings: Settings) -> list[dict[str, object]]:
    import asyncio

    from events.codec import to_builtins
    from lastmile.runtime import open_bus

    async def read() -> list[dict[str, object]]:
        async with open_bus(settings) as bus:
            return [to_builtins(e) async for _, e, _ in bus.read()]

    return asyncio.run(read())


def test_deploy_stage_change_and_retire_are_recorded_with_who_and_why(
    fresh_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pwd

    fresh_server.start()
    monkeypatch.delenv("LASTMILE_USERS_FILE", raising=False)
    monkeypatch.delenv("LASTMILE_DASHBOARD_STATE_DIR", raising=False)
    monkeypatch.setenv("USER", "somebody.else")  # a free name is not an identity
    state = _users(tmp_path / "state")
    settings = Settings(state_dir=state, nats_url=fresh_server.url,
                        pipelines_dir=tmp_path / "none")
    app, run = _app(settings), CliRunner().invoke
    me = "os:" + pwd.getpwuid(os.geteuid()).pw_name
    r = run(app, ["pipelines", "deploy", str(REFERENCE_DIR / "hfd.yaml"),
                  "--why", "first test cohort"])
    assert r.exit_code == 0, r.output
    assert "deployed hfd 1.0.0 in staging" in r.output
    # a free-text name is no longer accepted
    r = run(app, ["pipelines", "stage", "hfd", "silent", "--who", "dr.board", "--why", "x"])
    assert r.exit_code == 2 and "No such option" in r.output
    # a wrong password, or a user without the governance role: refused and recorded
    r = run(app, ["pipelines", "stage", "hfd", "silent", "--as", "dr.board",
                  "--password-file", str(state / "wrong.pw"), "--why", "x"])
    assert r.exit_code == 1 and "wrong password" in r.output, r.output
    r = run(app, ["pipelines", "stage", "hfd", "silent", "--as", "dr.read",
                  "--password-file", str(state / "read.pw"), "--why", "x"])
    assert r.exit_code == 1 and "governance" in r.output, r.output
    r = run(app, ["pipelines", "stage", "hfd", "silent", "--as", "dr.board",
                  "--password-file", str(state / "board.pw"), "--why", "silent trial approved"])
    assert r.exit_code == 0 and "staging -> silent" in r.output, r.output
    rows = {row["name"]: row for row in json.loads(run(app, ["pipelines", "list", "--json"])
                                                    .output)}
    assert rows["hfd"]["stage"] == "silent" and rows["hfd"]["deployed_by"] == me
    assert rows["hfd"]["file_matches_deployed"] is True
    assert rows["bts"]["stage"] is None  # a file on disk, never deployed
    r = run(app, ["pipelines", "retire", "hfd", "--why", "replaced"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(run(app, ["pipelines", "list", "--json"])
                                                    .output)}
    assert rows["hfd"]["stage"] == "retired"

    log = [(e["type"], e["actor"], e.get("user"), e.get("reason")) for e in _log(settings)]
    assert log == [
        ("engine.pipeline.deployed", me, None, "first test cohort"),
        ("access.sign_in.failed", me, "dr.board", "wrong password"),
        ("access.sign_in.failed", me, "dr.read", "the governance or admin role is needed"),
        ("access.sign_in.succeeded", "user:dr.board", "dr.board", None),
        ("engine.pipeline.stage_changed", "user:dr.board", None, "silent trial approved"),
        ("engine.pipeline.retired", me, None, "replaced"),
    ]
    assert not any("pass 1" in json.dumps(e) for e in _log(settings))


def test_deploying_an_invalid_file_says_where(fresh_server: EmbeddedNats, tmp_path: Path
                                              ) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REFERENCE_DIR / "hfd.yaml").read_text().replace("batch: 8", "batch: 0"))
    settings = Settings(state_dir=tmp_path / "state", nats_url="nats://127.0.0.1:1")
    r = CliRunner().invoke(_app(settings), ["pipelines", "deploy", str(bad)])
    assert r.exit_code == 3
    assert "operators.4.params.batch" in r.output and "bad.yaml:" in r.output
