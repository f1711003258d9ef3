"""The DICOM edge: a pynetdicom Storage SCP (C-ECHO, C-STORE) on one port, many AE titles.

Connection policy (``ingest.guard``): a source address outside the allow-list, a
peer over its connection limit, a connection that sends no association request in time,
an oversized PDU and a malformed A-ASSOCIATE-RQ are refused before anything else, each
recorded as an ``ingest.connection.refused`` event with the peer address. With TLS
(``ingest.tls``) the handshake runs on the connection's own thread, bounded by the same
request timeout.

Association policy (PS3.8 section 9.3.4): an unknown called AE title is rejected with
"called-AE-title-not-recognized"; a calling AE title outside the allow-list (when set)
with "calling-AE-title-not-recognized" (recorded as ``ingest.instance.rejected``); more
associations than ``max_associations`` with "local-limit-exceeded" (recorded as
``ingest.connection.refused``). Only associations count towards that limit, not
connections still waiting to send a request, so idle connections cannot lock real
modalities out. Accepted associations get TCP_NODELAY (DCMTK peers are ~10x slower with
Nagle on) and the configured maximum PDU. Transfer syntaxes: ``ingest.syntaxes``.

Large instances are received to disk in chunks (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``, ``ingest.spool``), so memory per association stays
about one PDU whatever the instance size.

C-STORE requests go to ``InstanceReceiver.receive`` (the store-and-publish path); its
named status is the answer. Each accepted association is recorded as events (opened;
then released or aborted, once per study it carried, with the SOP Instances it carried):
completion's evidence, read from the log by the completion service
(``ingest.association_facts``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.transport import ThreadedAssociationServer

from events.catalogue import InstanceRejected
from events.errors import EventsError
from ingest.association_facts import AssociationFacts
from ingest.guard import ConnectionGuard, GuardConfig, RefusalLog
from ingest.receiver import InstanceReceiver, Publish, Received
from ingest.rules import RuleSet
from ingest.sop_classes import offered_storage_classes, refused_contexts
from ingest.spool import SpooledDataset, spool_into
from ingest.spool import release as release_spool
from ingest.statuses import AssociationRejection, StoreStatus
from ingest.syntaxes import decodable_syntaxes
from ingest.tls import TlsFiles, server_context

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO), PS3.4 Annex A

#: the PDU bound when ``max_pdu`` is 0 ("unlimited" declared): a peer may still not make
#: us buffer more than this for one PDU
UNLIMITED_PDU_CAP = 64 << 20


@dataclass(frozen=True)
class ScpConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    general_ae: str = "LASTMILE"
    max_pdu: int = 1 << 20  # declared Maximum Length (PS3.8 D.1); 0 = unlimited
    max_associations: int = 10  # associations at once (connections waiting do not count)
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()  # addresses or networks (CIDR)
    request_timeout_s: float = 5.0  # connect (and TLS handshake) -> association request
    max_pending: int = 64  # connections that have not sent an association request
    max_connections_per_address: int = 8
    tls: TlsFiles | None = None  # DICOM TLS (PS3.15 B.1); None = plain TCP
    chunked_receive: bool = True  # data sets to disk in chunks (pynetdicom's option)
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
    _server: ThreadedAssociationServer | None = field(default=None, init=False)
    _ids: weakref.WeakKeyDictionary[Any, str] = field(
        default_factory=weakref.WeakKeyDictionary, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    guard: ConnectionGuard | None = field(default=None, init=False)
    accepted_syntaxes: tuple[str, ...] = field(default=(), init=False)
    _chunked_before: bool = field(default=False, init=False)
    facts: AssociationFacts = field(init=False)

    def __post_init__(self) -> None:
        self.facts = AssociationFacts(self.publish)

    def ae_titles(self) -> set[str]:
        return {self.config.general_ae, *self.rules().ae_titles()}

    def _recognise(self, called: str) -> bool:
        """A pipeline's AE title, in the rules file or deployed in the log; the log is
        asked once more before each answer (a deployment or retirement a moment ago)."""
        recognise = getattr(self.rules, "recognise", None)
        if recognise is not None:
            return bool(recognise(called))
        return called in self.rules().ae_titles()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.config.general_ae)
        ae.maximum_pdu_size = self.config.max_pdu
        # pynetdicom counts connections still waiting for their request as associations;
        # we count associations ourselves (``_on_requested``), so its own bound is only
        # the outer limit on threads
        ae.maximum_associations = 2 * (self.config.max_associations + self.config.max_pending)
        ae.network_timeout = self.config.network_timeout_s
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.add_supported_context(VERIFICATION)
        self.accepted_syntaxes = decodable_syntaxes().accepted
        for sop_class in offered_storage_classes():
            ae.add_supported_context(sop_class, list(self.accepted_syntaxes))
        return ae

    def _guard(self) -> ConnectionGuard:
        c = self.config
        return ConnectionGuard(
            GuardConfig(request_timeout_s=c.request_timeout_s,
                        max_pdu=c.max_pdu or UNLIMITED_PDU_CAP, max_pending=c.max_pending,
                        max_per_address=c.max_connections_per_address,
                        allowed_addresses=c.allowed_addresses,
                        max_message_bytes=self.receiver.config.max_instance_bytes + (4 << 20)),
            RefusalLog(self.publish), address_allowed)

    def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        # pynetdicom logs every request at INFO (several lines per instance, and DIMSE
        # dumps at DEBUG): that costs throughput and is no audit trail. Events are.
        pynetdicom_log = logging.getLogger("pynetdicom")
        if pynetdicom_log.getEffectiveLevel() < logging.WARNING:
            pynetdicom_log.setLevel(logging.WARNING)
        self._chunked_before = _config.STORE_RECV_CHUNKED_DATASET
        if self.config.chunked_receive:
            # process-wide in pynetdicom (read as each message is decoded): set while this
            # SCP runs, restored by ``stop`` for other pynetdicom SCPs in the process
            _config.STORE_RECV_CHUNKED_DATASET = True
            spool_into(self.receiver.store.tmp)
        ssl_context = server_context(self.config.tls) if self.config.tls else None
        self.guard = self._guard()
        self.guard.start()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ACSE_RECV, self._on_acse_received),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server = self._ae().start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers,
            ssl_context=ssl_context)
        assert server is not None  # block=False returns the server
        self._server = server
        port = int(server.server_address[1])
        log.info("DICOM SCP listening on %s:%d%s, AE titles %s", self.config.host, port,
                 " (TLS)" if ssl_context else "", ", ".join(sorted(self.ae_titles())))
        return port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        if self.guard is not None:
            self.guard.stop()
        _config.STORE_RECV_CHUNKED_DATASET = self._chunked_before
        release_spool(self.receiver.store.tmp)

    def flush_refusals(self) -> None:
        """Publish folded refusal counts whose window is over (the guard's thread does
        this too; the runner calls it on stop)."""
        if self.guard is not None:
            self.guard.refusals.flush()

    # ------------------------------------------------------------------ handlers

    def _on_open(self, event: evt.Event) -> None:
        assoc = event.assoc
        dul = assoc.dul
        sock = getattr(dul.socket, "socket", None)
        peer = cast(Any, event).address
        address = str(peer[0]) if peer else "unknown"
        if sock is None or self.guard is None:
            return
        if not self.guard.admit(assoc, address, sock):
            assoc.acse_timeout = 0.05  # nothing will come: let the thread end at once
            return
        # a connection must deliver its association request quickly: the guard shuts it
        # down at the deadline and records it; pynetdicom's own wait (the ACSE timeout,
        # restored in ``_on_requested``) is only the backstop, a little later
        assoc.acse_timeout = self.config.request_timeout_s + 5.0
        if isinstance(sock, ssl.SSLSocket) and not self._handshake(sock, address):
            assoc.acse_timeout = 0.05
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc_socket = cast(Any, dul.socket)
        assoc_socket.recv = self.guard.bounded_recv(assoc, address, sock, assoc_socket.recv)
        # not public API, but a plain attribute read on every loop of the DUL reactor
        # (pynetdicom 2.x and 3.x); see ``ScpConfig.dul_poll_s``
        if hasattr(dul, "_run_loop_delay"):
            dul._run_loop_delay = self.config.dul_poll_s

    def _handshake(self, sock: ssl.SSLSocket, address: str) -> bool:
        """The TLS handshake, on this connection's thread, within the request timeout."""
        try:
            sock.settimeout(self.config.request_timeout_s)
            sock.do_handshake()
            sock.settimeout(None)
            return True
        except (OSError, ValueError) as exc:
            assert self.guard is not None
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.guard.refusals.refuse(address, "tls_handshake_failed",
                                       f"TLS handshake failed ({type(exc).__name__}: "
                                       f"{getattr(exc, 'reason', None) or 'no detail'})")
            return False

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        assoc.acse_timeout = self.config.acse_timeout_s
        rq = cast(A_ASSOCIATE, assoc.requestor.primitive)
        called = str(rq.called_ae_title).strip()
        calling = str(rq.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if self.guard is not None:
            self.guard.requested(assoc)
            if self.guard.associations(exclude=assoc) >= self.config.max_associations:
                assoc.acse.send_reject(*AssociationRejection.LOCAL_LIMIT_EXCEEDED.rsd)
                self.guard.rejected(assoc)
                self.guard.refusals.refuse(
                    address, "too_many_associations",
                    f"{self.config.max_associations} associations are open already "
                    "(LASTMILE_DICOM_MAX_ASSOCIATIONS): A-ASSOCIATE-RJ local-limit-exceeded",
                    calling_ae=calling, called_ae=called)
                assoc.kill()
                return
        rejection: AssociationRejection | None = None
        if called != self.config.general_ae and not self._recognise(called):
            rejection = AssociationRejection.CALLED_AE_NOT_RECOGNIZED
            why = f"called AE title {called!r} is not one of ours"
        elif self.config.allowed_calling_aes and calling not in self.config.allowed_calling_aes:
            rejection = AssociationRejection.CALLING_AE_NOT_RECOGNIZED
            why = f"calling AE title {calling!r} is not on the allow-list"
        if rejection is None:
            self._ids[assoc] = str(uuid.uuid4())
            return
        assoc.acse.send_reject(*rejection.rsd)
        if self.guard is not None:
            self.guard.rejected(assoc)
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
            if self.guard is not None:
                self.guard.message_done(assoc)
            data: bytes | SpooledDataset
            try:
                spooled: Path | None = event.dataset_path  # chunked receive (to disk)
            except AttributeError:
                spooled = None
            if spooled is not None:
                data = SpooledDataset.open(spooled)
            elif req.DataSet is not None:
                data = req.DataSet.getvalue()
            else:
                return int(StoreStatus.ERROR_CANNOT_UNDERSTAND)
            received = Received(
                dataset=data,
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
        if outcome.status.is_success and assoc_id and outcome.study_uid:
            self.facts.carried(assoc_id, outcome.study_uid, received.sop_instance_uid or "")
        return int(outcome.status)

    # association facts (events): kept apart from the store path above

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        assoc_id = self._ids.get(assoc)
        if assoc_id is None:
            return
        primitive = cast(A_ASSOCIATE, assoc.requestor.primitive)
        self.facts.opened(assoc_id, calling_ae=str(assoc.requestor.ae_title).strip(),
                          called_ae=str(primitive.called_ae_title).strip(),
                          source_address=str(assoc.requestor.address),
                          refused_contexts=refused_contexts(assoc.rejected_contexts))

    def _on_acse_received(self, event: evt.Event) -> None:
        assoc_id = self._ids.get(event.assoc)
        primitive = getattr(event, "primitive", None)
        if assoc_id is not None and isinstance(primitive, A_ABORT | A_P_ABORT):
            # A-ABORT comes from the peer; A-P-ABORT is the connection or the DUL failing
            self.facts.ending(assoc_id, "requestor" if isinstance(primitive, A_ABORT)
                              else "network")

    def _on_released(self, event: evt.Event) -> None:
        assoc_id = self._ids.get(event.assoc)
        if assoc_id is not None:
            self.facts.ended(assoc_id, None)

    def _on_aborted(self, event: evt.Event) -> None:
        assoc_id = self._ids.get(event.assoc)
        if assoc_id is not None:
            # we sent the abort (network or DIMSE timeout, shutdown), or the peer did
            self.facts.ended(assoc_id, "acceptor" if getattr(event.assoc, "_sent_abort", False)
                             else None, aborted=True)

    def _on_closed(self, event: evt.Event) -> None:
        # pynetdicom reports the closed connection before the A-ABORT that came with it:
        # give the association's own end a moment, then record a lost connection
        assoc_id = self._ids.get(event.assoc)
        if assoc_id is not None:
            timer = threading.Timer(2.0, self.facts.ended, (assoc_id, "network"),
                                    {"aborted": True})
            timer.daemon = True
            timer.start()
