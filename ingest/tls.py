"""DICOM TLS for the receiver (PS3.15 Annex B.1/B.9, the BCP 195 secure transport
profiles): the server's TLS context.

pynetdicom wraps each accepted socket in the listening thread, and Python's default is
to run the TLS handshake right there: one peer that connects and never says hello
would stop every other connection from being accepted. ``server_context`` returns a
context whose sockets defer the handshake, which the SCP then runs on the
connection's own thread with the request timeout (``StorageScp._on_open``).

With a CA file, peers must present a certificate issued by it (mutual authentication,
as the DICOM profiles describe); without one, any client may connect over TLS.
TLS 1.2 is the minimum (BCP 195).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.errors import IngestError


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: our certificate chain and key, and the CA that signs our peers."""

    cert: Path
    key: Path
    ca: Path | None = None


class _DeferredHandshake(ssl.SSLContext):
    """An SSLContext whose server sockets do not handshake inside ``accept``."""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The receiver's context; raises ``IngestError`` naming the file that is wrong."""
    ctx = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise IngestError(f"DICOM TLS: cannot load the certificate {files.cert} with key "
                          f"{files.key} (LASTMILE_DICOM_TLS_CERT/_KEY): {exc}") from None
    if files.ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(files.ca))
        except (OSError, ssl.SSLError) as exc:
            raise IngestError(f"DICOM TLS: cannot load the CA file {files.ca} "
                              f"(LASTMILE_DICOM_TLS_CA): {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
