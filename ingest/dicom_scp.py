"""The DICOM edge: a pynetdicom Storage SCP (C-ECHO, C-STORE) on one port, many AE titles.

Association policy (PS3.8 section 9.3.4): an unknown called AE title is rejected with
"called-AE-title-not-recognized"; a calling AE title or source address outside the
allow-lists (when set) with "calling-AE-title-not-recognized" / "no-reason-given". Each
refusal is also recorded as an ``ingest.instance.rejected`` event. Accepted
associations get TCP_NODELAY (DCMTK peers are ~10x slower with Nagle on), the
configured maximum PDU and a bounded number of simultaneous associations.

C-STORE requests go to ``InstanceReceiver.receive`` (the store-and-publish path); its
named status is the answer. An association's release is passed on as a hint to the
completion detector, with how many instances it stored.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from events.base import utcnow
from events.catalogue import InstanceRejected
from events.errors import EventsError
from ingest.completion import Release
from ingest.receiver import InstanceReceiver, Publish, Received
from ingest.rules import RuleSet
from ingest.statuses import AssociationRejection, StoreStatus

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO), PS3.4 Annex A

#: What modalities send; stored as received, never transcoded. pynetdicom accepts the
#: first of these that the sender proposes, so compressed syntaxes come first: a sender
#: holding JPEG data and offering JPEG never has to decompress it for us.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1,
    JPEGLossless, JPEGBaseline8Bit, JPEGExtended12Bit, RLELossless,
    ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)


@dataclass(frozen=True)
class ScpConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    general_ae: str = "LASTMILE"
    max_pdu: int = 0  # 0 = unlimited
    max_associations: int = 10
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()  # addresses or networks (CIDR)
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    #: how long pynetdicom's DUL thread sleeps when a poll found nothing to do. Its
    #: default (1 ms) is paid several times per instance (waiting for the next PDU, for
    #: our response to be sent), which halves the throughput of a synchronous sender;
    #: 0.1 ms doubles a bare pynetdicom SCP (151 -> 294 MB/s, ``lastmile bench ingest``)
    #: for about 2% of a core per idle association.
    dul_poll_s: float = 0.0001


def address_allowed(address: str, allowed: Sequence[str]) -> bool:
    if not allowed:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


@dataclass
class StorageScp:
    """The SCP process part. ``start()`` listens in background threads; ``stop()`` ends it."""

    config: ScpConfig
    receiver: InstanceReceiver
    rules: Callable[[], RuleSet]
    publish: Publish
    on_release: Callable[[Release], None] | None = None
    _server: ThreadedAssociationServer | None = field(default=None, init=False)
    _ids: weakref.WeakKeyDictionary[Any, str] = field(
        default_factory=weakref.WeakKeyDictionary, init=False)
    _counts: dict[str, int] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def ae_titles(self) -> set[str]:
        return {self.config.general_ae, *self.rules().ae_titles()}

    def _ae(self) -> AE:
        ae = AE(ae_title=self.config.general_ae)
        ae.maximum_pdu_size = self.config.max_pdu
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.network_timeout_s
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.add_supported_context(VERIFICATION)
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        # pynetdicom logs every request at INFO (several lines per instance, and DIMSE
        # dumps at DEBUG): that costs throughput and is no audit trail. Events are.
        pynetdicom_log = logging.getLogger("pynetdicom")
        if pynetdicom_log.getEffectiveLevel() < logging.WARNING:
            pynetdicom_log.setLevel(logging.WARNING)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = self._ae().start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the server
        self._server = server
        port = int(server.server_address[1])
        log.info("DICOM SCP listening on %s:%d, AE titles %s", self.config.host, port,
                 ", ".join(sorted(self.ae_titles())))
        return port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    # ------------------------------------------------------------------ handlers

    def _on_open(self, event: evt.Event) -> None:
        dul = event.assoc.dul
        sock = getattr(dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # not public API, but a plain attribute read on every loop of the DUL reactor
        # (pynetdicom 2.x and 3.x); see ``ScpConfig.dul_poll_s``
        if hasattr(dul, "_run_loop_delay"):
            dul._run_loop_delay = self.config.dul_poll_s

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = cast(A_ASSOCIATE, assoc.requestor.primitive)
        called = str(rq.called_ae_title).strip()
        calling = str(rq.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        rejection: AssociationRejection | None = None
        if called not in self.ae_titles():
            rejection = AssociationRejection.CALLED_AE_NOT_RECOGNIZED
            why = f"called AE title {called!r} is not one of ours"
        elif self.config.allowed_calling_aes and calling not in self.config.allowed_calling_aes:
            rejection = AssociationRejection.CALLING_AE_NOT_RECOGNIZED
            why = f"calling AE title {calling!r} is not on the allow-list"
        elif not address_allowed(address, self.config.allowed_addresses):
            rejection = AssociationRejection.SOURCE_ADDRESS_NOT_ALLOWED
            why = f"source address {address} is not on the allow-list"
        if rejection is None:
            self._ids[assoc] = str(uuid.uuid4())
            return
        assoc.acse.send_reject(*rejection.rsd)
        log.warning("association rejected: %s (%s)", why, rejection.name)
        status = StoreStatus.REFUSED_NOT_AUTHORIZED
        try:
            self.publish([InstanceRejected.new(
                actor=f"scp:{called}", reason=f"association rejected ({rejection.name}): {why}",
                status=int(status), status_name=status.name, calling_ae=calling,
                called_ae=called, source_address=address,
            )])
        except EventsError as exc:
            log.error("could not record an association rejection: %s", exc)
        assoc.kill()  # waits until the A-ASSOCIATE-RJ is sent and the peer closed

    def _on_echo(self, event: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        assoc = event.assoc
        assoc_id = self._ids.get(assoc)
        try:
            req = cast(C_STORE, event.request)
            primitive = cast(A_ASSOCIATE, assoc.requestor.primitive)
            dataset = req.DataSet
            if dataset is None:
                return int(StoreStatus.ERROR_CANNOT_UNDERSTAND)
            received = Received(
                dataset=dataset.getvalue(),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                sop_class_uid=str(req.AffectedSOPClassUID or event.context.abstract_syntax),
                sop_instance_uid=str(req.AffectedSOPInstanceUID or "") or None,
                calling_ae=str(assoc.requestor.ae_title).strip(),
                called_ae=str(primitive.called_ae_title).strip(),
                source_address=str(assoc.requestor.address),
                association_id=assoc_id,
            )
            outcome = self.receiver.receive(received)
        except Exception:  # noqa: BLE001 - never let an exception escape into the association
            log.exception("C-STORE handler failed")
            return int(StoreStatus.PROCESSING_FAILURE)
        if outcome.status.is_success and outcome.stored is not None and assoc_id:
            with self._lock:
                self._counts[assoc_id] = self._counts.get(assoc_id, 0) + 1
        return int(outcome.status)

    def _on_released(self, event: evt.Event) -> None:
        assoc_id = self._ids.get(event.assoc)
        if assoc_id is None:
            return
        with self._lock:
            stored = self._counts.pop(assoc_id, 0)
        if stored and self.on_release is not None:
            self.on_release(Release(assoc_id, stored, utcnow()))

    def _on_aborted(self, event: evt.Event) -> None:
        # an aborted association gives no completeness hint: the quiet period decides
        assoc_id = self._ids.get(event.assoc)
        if assoc_id is not None:
            with self._lock:
                self._counts.pop(assoc_id, None)
