"""The embedded NATS server requires credentials, one user per service role with least
permissions (issue 18, item 1), on a real nats-server started the way `lastmile up`
starts it (``lastmile.runtime.embedded_server``)."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
import typer
from typer.testing import CliRunner

from events.catalogue import (
    CaseAssigned,
    InferenceCompleted,
    InferenceRequested,
    InstanceRejected,
    ReviewSubmitted,
)
from events.errors import BusUnavailable, PublishError, Unprocessable
from events.jetstream import BusSettings, EventBus
from events.nats_auth import ROLES, CredentialsError, NatsCredentials
from events.nats_server import EmbeddedNats, free_port
from lastmile.cli_security import security_app
from lastmile.runtime import embedded_server
from lastmile.services import services_for
from lastmile.settings import ConfigError, Settings

pytestmark = pytest.mark.server

STUDY = "1.2.826.0.1.3680043.8.498.1818"


def _review(reader: str = "dr.house") -> ReviewSubmitted:
    return ReviewSubmitted.new(actor=reader, study_uid=STUDY, pipeline="hfd", run_key="k1",
                               reader=reader, agree={"fracture": True})


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[Settings, EmbeddedNats]]:
    settings = Settings(state_dir=tmp_path / "state", nats_port=free_port(),
                        publish_retry_s=2.0)
    with embedded_server(settings) as server:
        yield settings, server


async def _connect(settings: Settings, role: str) -> EventBus:
    return await EventBus.connect(settings.bus(role), ensure_stream=role == "admin")


async def test_credentials_are_generated_owner_only_and_required(
        site: tuple[Settings, EmbeddedNats]) -> None:
    settings, server = site
    path = settings.state_dir / "nats-credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = json.loads(path.read_text())["users"]
    assert set(users) == set(ROLES)
    assert len({u["password"] for u in users.values()}) == len(ROLES)  # one per role
    assert stat.S_IMODE((settings.state_dir / "nats" / "nats.conf").stat().st_mode) == 0o600

    # no credential, or a wrong one: the connection is refused, and says what to check
    with pytest.raises(BusUnavailable, match="refused the credentials"):
        await EventBus.connect(BusSettings(servers=(server.url,), connect_timeout_s=1.0))
    with pytest.raises(BusUnavailable, match="nats-credentials.json"):
        await EventBus.connect(BusSettings(servers=(server.url,), user="lastmile-admin",
                                           password="guess", connect_timeout_s=1.0))
    # the same file on the next start: the credentials are kept, not regenerated
    again = Settings(state_dir=settings.state_dir, nats_port=settings.nats_port)
    assert again.bus("pages").password == users["pages"]["password"]


async def test_each_role_publishes_only_its_own_facts(
        site: tuple[Settings, EmbeddedNats]) -> None:
    settings, _ = site
    admin = await _connect(settings, "admin")
    pages = await _connect(settings, "pages")
    ingest = await _connect(settings, "ingest")
    engine = await _connect(settings, "engine")
    review = await _connect(settings, "review")
    try:
        done = InferenceCompleted.new(actor="w", study_uid=STUDY, pipeline="hfd", run_key="k1",
                                      model_name="hfd", model_version="1", runtime="ort-cpu",
                                      runtime_reason="test", duration_s=1.0, inference_s=1.0)
        await engine.publish(done)  # the engine writes engine facts
        await pages.publish(_review())  # the pages write reviews
        await ingest.publish(InstanceRejected.new(actor="LASTMILE", reason="x", status=0xA900,
                                                  status_name="x", calling_ae="A",
                                                  called_ae="B"))
        await review.publish(CaseAssigned.new(actor="assigner", study_uid=STUDY,
                                              pipeline="hfd", run_key="k1", reader="dr.house"))

        # a stolen pages credential cannot write an engine fact ...
        forged = InferenceRequested.new(actor="w", study_uid=STUDY, pipeline="hfd",
                                        run_key="k2")
        with pytest.raises(PublishError, match="lastmile-pages may not publish"):
            await pages.publish(forged)
        # ... and a stolen receiver credential cannot forge a clinician's review
        with pytest.raises(PublishError, match="permissions violation"):
            await ingest.publish(_review("dr.cuddy"))
        with pytest.raises(PublishError, match="permissions violation"):
            await review.publish(_review("dr.cuddy"))

        # every role reads the log (the projector's and pages' reads work)
        projector = await _connect(settings, "projector")
        try:
            seen = [e.type for _, e in await projector.history(STUDY)]
        finally:
            await projector.close()
        assert seen == ["engine.inference.completed", "review.review.submitted",
                        "review.case.assigned"]
        assert [e.type for _, e in await pages.history(STUDY)] == seen
        assert (await admin.last_sequence()) == 4  # nothing forged was stored
    finally:
        for b in (admin, pages, ingest, engine, review):
            await b.close()


async def test_a_consumer_runs_with_its_role_and_dead_letters(
        site: tuple[Settings, EmbeddedNats]) -> None:
    settings, _ = site
    admin = await _connect(settings, "admin")
    engine = await _connect(settings, "engine")
    try:
        await admin.publish(InferenceRequested.new(actor="t", study_uid=STUDY, pipeline="hfd",
                                                   run_key="k1"))
        stop = asyncio.Event()
        handled: list[str] = []

        async def handler(event: object, delivery: object) -> None:
            handled.append("x")
            stop.set()
            raise Unprocessable("cannot work")

        await asyncio.wait_for(engine.consume("engine-workers", handler, stop=stop), 20)
        assert handled == ["x"]
        # the engine's durable consumer worked, and its dead letter was allowed
        dead = [e.type async for _, e, _ in admin.read() if not isinstance(e, Exception)]
        assert dead == ["engine.inference.requested", "system.delivery.failed"]
    finally:
        await admin.close()
        await engine.close()


async def test_no_role_but_admin_may_change_the_stream_or_delete(
        site: tuple[Settings, EmbeddedNats]) -> None:
    """The JetStream API itself: a raw client with the pages' credential cannot delete the
    stream, purge it, delete a message, create a stream of its own, or pull from (or
    redefine, or delete) the engine's durable consumer (it deletes its own readers')."""
    settings, server = site
    admin = await _connect(settings, "admin")
    await admin.publish(_review())
    pages = settings.bus("pages")
    denied: list[str] = []

    async def on_error(exc: Exception) -> None:
        denied.append(str(exc))

    nc = await nats.connect(server.url, user=pages.user, password=pages.password,
                            error_cb=on_error)
    try:
        for subject, body in [("$JS.API.STREAM.DELETE.LASTMILE", b""),
                              ("$JS.API.STREAM.PURGE.LASTMILE", b""),
                              ("$JS.API.STREAM.MSG.DELETE.LASTMILE", b'{"seq":1}'),
                              ("$JS.API.STREAM.CREATE.MINE", b'{"name":"MINE"}'),
                              # nor pull or take over the engine's work queue
                              ("$JS.API.CONSUMER.MSG.NEXT.LASTMILE.engine-workers",
                               b'{"batch":1}'),
                              ("$JS.API.CONSUMER.CREATE.LASTMILE.engine-workers.lm.ev.>",
                               b'{"stream_name":"LASTMILE","config":{"name":"engine-workers",'
                               b'"durable_name":"engine-workers","ack_policy":"explicit"}}'),
                              ("$JS.API.CONSUMER.DELETE.LASTMILE.engine-workers", b"")]:
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(subject, body, timeout=1.0)
        assert len(denied) == 7 and all("permissions violation" in d for d in denied)
        assert await admin.last_sequence() == 1
    finally:
        await nc.close()
        await admin.close()


def test_credentials_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    settings.bus()  # generates it
    path = settings.state_dir / "nats-credentials.json"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        settings.bus("pages")
    path.write_text("{}")
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match="not a Lastmile NATS credentials file"):
        NatsCredentials.read(path)


def test_services_of_up_run_as_their_roles(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", pipelines_dir=tmp_path / "none",
                        services=("ingest", "engine", "projector", "dashboard"))
    roles = {s.name: s.nats_role for s in services_for(settings)}
    assert roles == {"dicom-scp": "ingest", "study-completion": "ingest",
                     "engine-worker": "engine", "engine-edits": "engine",
                     "pacs-redelivery": "engine", "projector": "projector",
                     "dashboard": "pages", "review-assigner": "review"}


async def test_rotate_is_refused_while_the_server_runs_and_old_passwords_then_fail(
        tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", nats_port=free_port())
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = settings

    app.add_typer(security_app, name="security")
    old = settings.bus("pages")
    with embedded_server(settings):
        r = await asyncio.to_thread(CliRunner().invoke, app, ["security", "rotate"])
        assert r.exit_code != 0 and "in use by pid" in str(r.exception)
    r = await asyncio.to_thread(CliRunner().invoke, app, ["security", "rotate"])
    assert r.exit_code == 0, r.output
    new = settings.bus("pages")
    assert new.password != old.password
    config = await asyncio.to_thread(CliRunner().invoke, app, ["security", "nats-config"])
    assert new.password in config.output and "$JS.API.CONSUMER.MSG.NEXT.LASTMILE.*" \
        in config.output
    with embedded_server(settings):
        with pytest.raises(BusUnavailable, match="refused the credentials"):
            await EventBus.connect(old, ensure_stream=False)
        bus = await EventBus.connect(new, ensure_stream=False)
        await bus.close()
