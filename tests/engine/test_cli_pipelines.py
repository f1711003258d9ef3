"""`lastmile pipelines list|deploy|stage|retire` against a real nats-server."""

from __future__ import annotations

import json
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


def test_deploy_stage_change_and_retire_are_recorded_with_who_and_why(
    fresh_server: EmbeddedNats, tmp_path: Path
) -> None:
    fresh_server.start()
    settings = Settings(state_dir=tmp_path / "state", nats_url=fresh_server.url,
                        pipelines_dir=tmp_path / "none")
    app, run = _app(settings), CliRunner().invoke
    r = run(app, ["pipelines", "deploy", str(REFERENCE_DIR / "hfd.yaml"), "--who", "eng.ana",
                  "--why", "first test cohort"])
    assert r.exit_code == 0, r.output
    assert "deployed hfd 1.0.0 in staging" in r.output
    r = run(app, ["pipelines", "stage", "hfd", "silent", "--who", "dr.board",
                  "--why", "silent trial approved"])
    assert r.exit_code == 0 and "staging -> silent" in r.output, r.output
    rows = {row["name"]: row for row in json.loads(run(app, ["pipelines", "list", "--json"])
                                                    .output)}
    assert rows["hfd"]["stage"] == "silent" and rows["hfd"]["deployed_by"] == "eng.ana"
    assert rows["hfd"]["file_matches_deployed"] is True
    assert rows["bts"]["stage"] is None  # a file on disk, never deployed
    r = run(app, ["pipelines", "retire", "hfd", "--why", "replaced", "--who", "eng.ana"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(run(app, ["pipelines", "list", "--json"])
                                                    .output)}
    assert rows["hfd"]["stage"] == "retired"


def test_deploying_an_invalid_file_says_where(fresh_server: EmbeddedNats, tmp_path: Path
                                              ) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REFERENCE_DIR / "hfd.yaml").read_text().replace("batch: 8", "batch: 0"))
    settings = Settings(state_dir=tmp_path / "state", nats_url="nats://127.0.0.1:1")
    r = CliRunner().invoke(_app(settings), ["pipelines", "deploy", str(bad)])
    assert r.exit_code == 3
    assert "operators.4.params.batch" in r.output and "bad.yaml:" in r.output
