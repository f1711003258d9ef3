"""DICOM TLS (PS3.15 Annex B.1, issue 18 item 9): the receiver and the PACS publisher
against dcmtk's TLS peers (storescu +tls, storescp +tls; dcmtk here is built with
OpenSSL), with a throw-away CA made in the test by the openssl command line."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from bench.ingest import ct_instances
from bench.peers import Storescp
from engine.pacs import PacsAddress, c_store
from events.catalogue import ConnectionRefused, InstanceStored
from events.jetstream import EventBus
from events.nats_server import free_port
from ingest.tls import TlsFiles
from tests.ingest.conftest import StartIngest, needs_dcmtk, run_tool, storescu, wait_for_events
from tests.ingest.test_receiver_guard import refused

pytestmark = [pytest.mark.server, needs_dcmtk,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=lastmile-test-{name}", cwd=d)


def _leaf(d: Path, name: str, ca: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca signs server and modality; rogue-ca signs rogue (a certificate we must refuse)."""
    d = tmp_path_factory.mktemp("dicom-pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca")
    _leaf(d, "modality", "ca")
    _leaf(d, "rogue", "rogue-ca")
    return d


def _tls(pki: Path, who: str) -> tuple[str, ...]:
    return ("+tls", str(pki / f"{who}.key"), str(pki / f"{who}.pem"),
            "+cf", str(pki / "ca.pem"))


async def test_the_receiver_speaks_tls_and_refuses_plain_and_foreign_peers(
        start_ingest: StartIngest, bus: EventBus, pki: Path, tmp_path: Path) -> None:
    r = await start_ingest(tls=TlsFiles(pki / "server.pem", pki / "server.key",
                                        pki / "ca.pem"), request_timeout_s=3.0)
    files = ct_instances(tmp_path / "ct", 2)
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    # a modality with a certificate from our CA
    rc, out = await storescu(r.port, files, called="LM_LTS", extra=_tls(pki, "modality"))
    assert rc == 0, out
    stored = await wait_for_events(bus, study, "ingest.instance.stored", 2)
    assert all(isinstance(e, InstanceStored) for e in stored)
    # plain TCP to the TLS port, and a certificate from another CA: refused, recorded
    plain = ct_instances(tmp_path / "plain", 1)
    rc, out = await storescu(r.port, plain, called="LM_LTS")
    assert rc != 0
    rc, out = await storescu(r.port, plain, called="LM_LTS", extra=(
        "+tls", str(pki / "rogue.key"), str(pki / "rogue.pem"), "+cf", str(pki / "ca.pem")))
    assert rc != 0
    evs = await refused(bus, "tls_handshake_failed", count=2)
    assert sum(e.refused_count for e in evs) >= 2
    assert all(isinstance(e, ConnectionRefused) and e.source_address == "127.0.0.1"
               for e in evs)
    plain_study = pydicom.dcmread(plain[0], stop_before_pixels=True).StudyInstanceUID
    assert [e for _, e in await bus.history(plain_study)] == []


async def test_a_silent_tls_client_does_not_stop_the_receiver_accepting(
        start_ingest: StartIngest, pki: Path, tmp_path: Path) -> None:
    """pynetdicom wraps accepted sockets in its listening thread; with the handshake
    there, one client that never sends its hello would block every other connection."""
    r = await start_ingest(tls=TlsFiles(pki / "server.pem", pki / "server.key",
                                        pki / "ca.pem"), request_timeout_s=20.0)
    silent = socket.create_connection(("127.0.0.1", r.port))
    try:
        t0 = time.monotonic()
        rc, out = await storescu(r.port, ct_instances(tmp_path / "ct", 1), called="LM_LTS",
                                 extra=_tls(pki, "modality"))
        assert rc == 0, out
        assert time.monotonic() - t0 < 10.0  # not the 20 s the silent client may wait
    finally:
        silent.close()


async def test_the_pacs_publisher_sends_over_tls(
        pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (path,) = ct_instances(tmp_path / "result", 1)
    ds = pydicom.dcmread(path)
    port = free_port()
    options = ("+tls", str(pki / "server.key"), str(pki / "server.pem"),
               "+cf", str(pki / "ca.pem"))
    with Storescp(tmp_path / "pacs", port, options=options):
        dest = PacsAddress("STORESCP", "127.0.0.1", port)
        # without TLS settings the PACS's TLS port does not answer DICOM
        with pytest.raises(Exception):  # noqa: B017 - PublishFailedError after no retries
            await asyncio.to_thread(c_store, [ds], dest, retries=0, timeout_s=5)
        monkeypatch.setenv("LASTMILE_PACS_TLS_CA", str(pki / "ca.pem"))
        monkeypatch.setenv("LASTMILE_PACS_TLS_CERT", str(pki / "modality.pem"))
        monkeypatch.setenv("LASTMILE_PACS_TLS_KEY", str(pki / "modality.key"))
        outcome = await asyncio.to_thread(c_store, [ds], dest, retries=0, timeout_s=10)
        assert outcome[0].status.startswith("Success")
        deadline = time.monotonic() + 10
        while not list((tmp_path / "pacs").glob("*")) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    (received,) = list((tmp_path / "pacs").iterdir())
    assert pydicom.dcmread(received).SOPInstanceUID == ds.SOPInstanceUID


async def test_echoscu_over_tls(start_ingest: StartIngest, pki: Path) -> None:
    r = await start_ingest(tls=TlsFiles(pki / "server.pem", pki / "server.key"))
    rc, out = await run_tool("echoscu", "-aec", "LM_BTS", *_tls(pki, "modality"),
                             "127.0.0.1", str(r.port))
    assert rc == 0, out


def test_half_a_tls_configuration_is_a_configuration_error(tmp_path: Path) -> None:
    from lastmile.services_ingest import ingest_options
    from lastmile.settings import ConfigError, Settings

    cert = tmp_path / "c.pem"
    with pytest.raises(ConfigError, match="LASTMILE_DICOM_TLS_KEY"):
        ingest_options(Settings(state_dir=tmp_path, dicom_tls_cert=cert))
    with pytest.raises(ConfigError, match="LASTMILE_DICOM_TLS_CERT"):
        ingest_options(Settings(state_dir=tmp_path, dicom_tls_ca=cert))
    opts = ingest_options(Settings(state_dir=tmp_path, dicom_tls_cert=cert,
                                   dicom_tls_key=cert, dicom_request_timeout_s=2))
    assert opts.scp.tls == TlsFiles(cert, cert, None) and opts.scp.request_timeout_s == 2
