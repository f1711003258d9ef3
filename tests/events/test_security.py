"""NATS with a password and TLS, on a real nats-server: a client without the password or
without the CA is refused with a message that says so; with both it publishes and reads.
The certificates are made here with the openssl command line (a throw-away CA)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from events.catalogue import InstanceRejected
from events.errors import BusUnavailable
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=lastmile-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
             cwd=d)
    return d


async def test_password_and_tls_are_required_when_configured(pki: Path,
                                                             tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), user="lastmile",
                          password="s3cret-pw", tls_cert=pki / "server.pem",
                          tls_key=pki / "server.key")
    with server:
        conf = tmp_path / "nats" / "nats.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600  # it holds the password
        base = {"servers": (server.url,), "stream": "SEC", "connect_timeout_s": 5.0}
        # a client that cannot verify the server waits out its whole connect budget
        quick = {**base, "connect_timeout_s": 1.0}

        with pytest.raises(BusUnavailable, match="LASTMILE_NATS_PASSWORD"):  # no password
            await EventBus.connect(BusSettings(**base, tls_ca=str(pki / "ca.pem")))
        with pytest.raises(BusUnavailable, match="LASTMILE_NATS_TLS_CA"):  # no CA to verify
            await EventBus.connect(BusSettings(**quick, user="lastmile", password="s3cret-pw"))

        bus = await EventBus.connect(BusSettings(**base, user="lastmile", password="s3cret-pw",
                                                 tls_ca=str(pki / "ca.pem")))
        try:
            ev = InstanceRejected.new(actor="test", reason="tls works", status=0xA900,
                                      status_name="x", calling_ae="A", called_ae="B")
            await bus.publish(ev)
            seen = [e async for _, e, _ in bus.read()]  # read back over TLS
            assert [e.event_id for e in seen] == [ev.event_id]
        finally:
            await bus.close()
    log = (tmp_path / "nats" / "nats-server.log").read_text(errors="replace")
    assert "s3cret-pw" not in log
