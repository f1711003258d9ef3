"""What the receiver lets in before an association exists: the connection guard.

pynetdicom accepts every TCP connection, starts two threads for it and reads whatever
PDU the peer announces, in full, before any AE title or address check: a peer
declaring a 4 GiB A-ASSOCIATE-RQ had 400 MiB buffered in 1.5 s, and fifteen idle
connections held every association slot ("Local Limit Exceeded") for the ACSE timeout,
over and over. The guard closes those doors, per receiver process:

- **at connect** (``admit``): the source address is checked against the allow-list and
  the number of connections from that address is bounded; a refused connection is
  closed at once, before a byte is read. The connections that have not yet sent an
  association request are bounded too: when they are full, the one waiting longest is
  closed to admit the new one (a modality asks within milliseconds; an idler is the
  one that waits).
- **before the association is accepted** (``bounded_recv``): a PDU longer than an
  A-ASSOCIATE-RQ can reasonably be (``max_request_pdu``) is refused from its 6-byte
  header, nothing of its body is read; afterwards no PDU may exceed the maximum PDU we
  declared (PS3.8 section 9.3.1: P-DATA-TF PDUs are bounded by the receiver's Maximum
  Length). The A-ASSOCIATE-RQ itself is checked against PS3.8 section 9.3.2 and the AE
  VR of PS3.5 section 6.2 (``check_request``): a request a strict parser refuses is
  answered with an A-ASSOCIATE-RJ (PS3.8 section 9.3.4), not dropped.
- **a deadline** (``reap``): a connection that has not delivered an association request
  within ``request_timeout_s`` of connecting is shut down (``no_association_request``).

Every refusal becomes an ``ingest.connection.refused`` event naming the peer address and
the reason, never patient data; a burst from one address is folded into one event per
window with a count (``RefusalLog``), so a flood cannot flood the event log.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from events.catalogue import ConnectionRefused
from events.errors import EventsError

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04


@dataclass(frozen=True)
class GuardConfig:
    """Bounds per receiver process (README, "The DICOM receiver's settings")."""

    request_timeout_s: float = 5.0  # connect -> A-ASSOCIATE-RQ received
    max_request_pdu: int = 256 * 1024  # an A-ASSOCIATE-RQ of 128 contexts is ~60 KiB
    max_pdu: int = 1 << 20  # declared Maximum Length; PDUs after acceptance are bounded by it
    max_pending: int = 64  # connections that have not sent a request yet
    max_per_address: int = 8  # connections (pending or associated) from one address
    allowed_addresses: tuple[str, ...] = ()
    refusal_window_s: float = 10.0
    #: P-DATA bytes one message may take (the instance size limit plus room for the
    #: command and PDU headers): a data set is received to disk, so without this a
    #: sender could fill the disk before the size check at the end of the message
    max_message_bytes: int = 2048 << 20


@dataclass
class _Conn:
    address: str
    opened: float
    assoc: weakref.ReferenceType[Any]
    raw: Any  # the socket (plain or TLS) to shut down
    requested: bool = False
    closed: bool = False
    message_bytes: int = 0  # P-DATA bytes since the last message was handed over


def _is_over(assoc: Any) -> bool:
    """The association's thread has run and finished (not merely not started yet)."""
    return getattr(assoc, "ident", None) is not None and not assoc.is_alive()


def _shutdown(raw: Any, assoc: Any = None) -> None:
    """Shut the connection down; wake its association thread if it is still waiting for
    a request (pynetdicom would otherwise wait out its ACSE timeout: a closed connection
    yields no primitive, and its thread would hold a slot until then)."""
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    if queue is not None and not getattr(assoc, "is_established", False):
        queue.put(None)  # receive_pdu returns None: "no request", the thread ends


@dataclass
class RefusalLog:
    """Records refusals as events, folding bursts: the first refusal of an (address,
    reason) is published at once, later ones within ``window_s`` are counted and
    published with their count by the next refusal after the window, or by ``flush``."""

    publish: Callable[[Sequence[ConnectionRefused]], None]
    window_s: float = 10.0
    actor: str = "scp"
    _last: dict[tuple[str, str], float] = field(default_factory=dict, init=False)
    _pending: dict[tuple[str, str], tuple[int, str, str | None, str | None]] = field(
        default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def refuse(self, address: str, code: str, reason: str, *, calling_ae: str | None = None,
               called_ae: str | None = None) -> None:
        log.warning("connection from %s refused (%s): %s", address, code, reason)
        key = (address, code)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.window_s:
                count = self._pending.get(key, (0, reason, calling_ae, called_ae))[0] + 1
                self._pending[key] = (count, reason, calling_ae, called_ae)
                return
            self._last[key] = now
            folded = self._pending.pop(key, None)
        count = 1 + (folded[0] if folded else 0)
        self._send(address, code, reason, count, calling_ae, called_ae)

    def flush(self, *, force: bool = False) -> None:
        """Publish folded counts whose window is over (all of them with ``force``)."""
        now = time.monotonic()
        due = []
        with self._lock:
            for key, value in list(self._pending.items()):
                if force or now - self._last.get(key, 0.0) >= self.window_s:
                    due.append((key, value))
                    del self._pending[key]
                    self._last[key] = now
        for (address, code), (count, reason, calling, called) in due:
            self._send(address, code, reason, count, calling, called)

    def _send(self, address: str, code: str, reason: str, count: int,
              calling_ae: str | None, called_ae: str | None) -> None:
        try:
            self.publish([ConnectionRefused.new(
                actor=self.actor, source_address=address, reason_code=code,
                reason=reason[:500], refused_count=count, calling_ae=calling_ae,
                called_ae=called_ae)])
        except EventsError as exc:
            log.error("could not record a refused connection from %s: %s", address, exc)


# --------------------------------------------------------------------------- PS3.8 checks


class BadRequest(Exception):
    """An A-ASSOCIATE-RQ a strict parser refuses; ``rsd`` is the A-ASSOCIATE-RJ to send."""

    def __init__(self, reason: str, rsd: tuple[int, int, int]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rsd = rsd


def _ae_problem(raw: bytes) -> str | None:
    """Why 16 bytes are not a valid AE title value (PS3.5 section 6.2, VR AE): the
    default repertoire without backslash and control characters, not only spaces."""
    if any(b >= 0x80 for b in raw):
        return "has bytes outside the default character repertoire"
    if any(b < 0x20 or b == 0x5C for b in raw):
        return "has a control character or a backslash"
    if not raw.strip(b" "):
        return "is empty (only spaces)"
    return None


def check_request(pdu: bytes) -> tuple[str, str]:
    """Check a whole A-ASSOCIATE-RQ PDU (PS3.8 section 9.3.2); return (calling, called)
    AE titles, or raise ``BadRequest`` with the rejection to send (PS3.8 section 9.3.4:
    result 1 permanent; source 1 service-user with reason 3 calling-AE-title-not-
    recognized or 7 called-AE-title-not-recognized, source 2 service-provider (ACSE)
    with reason 2 protocol-version-not-supported; else no-reason-given)."""
    if len(pdu) < 74:
        raise BadRequest("the association request is shorter than its fixed fields",
                         (1, 1, 1))
    (version,) = struct.unpack_from(">H", pdu, 6)
    if not version & 1:
        raise BadRequest("the association request does not support protocol version 1",
                         (1, 2, 2))
    called, calling = pdu[10:26], pdu[26:42]
    for raw, what, rsd in ((calling, "calling", (1, 1, 3)), (called, "called", (1, 1, 7))):
        problem = _ae_problem(raw)
        if problem is not None:
            raise BadRequest(f"the {what} AE title {problem} (PS3.5 6.2)", rsd)
    try:
        from pynetdicom.pdu import A_ASSOCIATE_RQ as RqPdu

        rq = RqPdu()
        rq.decode(pdu)
        rq.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any decode failure is a malformed request
        raise BadRequest(f"the association request does not decode ({type(exc).__name__})",
                         (1, 1, 1)) from None
    return calling.decode("ascii").strip(), called.decode("ascii").strip()


def reject_pdu(rsd: tuple[int, int, int]) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 section 9.3.4)."""
    result, source, reason = rsd
    return struct.pack(">BBLBBBB", A_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


# --------------------------------------------------------------------------- the guard


@dataclass
class ConnectionGuard:
    config: GuardConfig
    refusals: RefusalLog
    address_allowed: Callable[[str, Sequence[str]], bool]
    _conns: dict[int, _Conn] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _reaper: threading.Thread | None = field(default=None, init=False)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._reaper = threading.Thread(target=self._reap_loop, name="dicom-guard",
                                        daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        self.refusals.flush(force=True)

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.25):
            self.reap()
            self.refusals.flush()

    def _prune(self) -> None:
        for key, conn in list(self._conns.items()):
            assoc = conn.assoc()
            if assoc is None or _is_over(assoc):
                del self._conns[key]

    # ------------------------------------------------------------ at connect

    def admit(self, assoc: Any, address: str, raw: Any) -> bool:
        """Called when a connection opens (before anything is read). Returns False, and
        shuts the socket down, when it is refused."""
        refusal: tuple[str, str] | None = None
        evicted: _Conn | None = None
        with self._lock:
            self._prune()
            live = [c for c in self._conns.values() if not c.closed]
            from_address = sum(1 for c in live if c.address == address)
            pending = [c for c in live if not c.requested]
            if not self.address_allowed(address, self.config.allowed_addresses):
                refusal = ("address_not_allowed",
                           f"source address {address} is not on the allow-list")
            elif from_address >= self.config.max_per_address:
                refusal = ("too_many_from_address",
                           f"{from_address} connections from this address already "
                           f"(limit {self.config.max_per_address}, "
                           "LASTMILE_DICOM_MAX_CONNECTIONS_PER_ADDRESS)")
            else:
                if len(pending) >= self.config.max_pending:
                    # full of connections that have not asked for anything: the one
                    # waiting longest goes, so a flood from many addresses cannot keep a
                    # modality (which asks within milliseconds) from connecting
                    evicted = min(pending, key=lambda c: c.opened)
                    evicted.closed = True
                self._conns[id(assoc)] = _Conn(address, time.monotonic(), weakref.ref(assoc),
                                               raw)
        if evicted is not None:
            _shutdown(evicted.raw, evicted.assoc())
            self.refusals.refuse(evicted.address, "too_many_pending",
                                 f"{self.config.max_pending} connections were waiting for "
                                 "an association request; the one waiting longest was closed "
                                 "(LASTMILE_DICOM_MAX_PENDING)")
        if refusal is None:
            return True
        _shutdown(raw)
        self.refusals.refuse(address, *refusal)
        return False

    def requested(self, assoc: Any) -> None:
        """The association request arrived and parsed: the deadline no longer applies."""
        with self._lock:
            conn = self._conns.get(id(assoc))
            if conn is not None:
                conn.requested = True

    def reap(self) -> None:
        """Shut down connections past the request deadline (called by the reaper)."""
        now = time.monotonic()
        late: list[_Conn] = []
        with self._lock:
            self._prune()
            for conn in self._conns.values():
                if (not conn.requested and not conn.closed
                        and now - conn.opened > self.config.request_timeout_s):
                    conn.closed = True
                    late.append(conn)
        for conn in late:
            _shutdown(conn.raw, conn.assoc())
            self.refusals.refuse(
                conn.address, "no_association_request",
                f"no valid association request within {self.config.request_timeout_s:g} s "
                "of connecting (LASTMILE_DICOM_REQUEST_TIMEOUT_S)")

    def associations(self, exclude: Any = None) -> int:
        """Connections that sent an association request and are still open."""
        with self._lock:
            self._prune()
            return sum(1 for key, c in self._conns.items()
                       if c.requested and not c.closed and key != id(exclude))

    def rejected(self, assoc: Any) -> None:
        """The association was rejected: it no longer counts while its thread ends."""
        with self._lock:
            conn = self._conns.get(id(assoc))
            if conn is not None:
                conn.closed = True

    def message_done(self, assoc: Any) -> None:
        """A DIMSE message was handed to its handler: the next one starts from zero."""
        with self._lock:
            conn = self._conns.get(id(assoc))
            if conn is not None:
                conn.message_bytes = 0

    def _count_message(self, assoc: Any, n: int) -> int:
        with self._lock:
            conn = self._conns.get(id(assoc))
            if conn is None:
                return 0
            conn.message_bytes += n
            return conn.message_bytes

    def counts(self) -> tuple[int, int]:
        """(connections, of which pending) known to the guard now."""
        with self._lock:
            self._prune()
            return len(self._conns), sum(1 for c in self._conns.values() if not c.requested)

    # ------------------------------------------------------------ reads

    def bounded_recv(self, assoc: Any, address: str, raw: Any,
                     recv: Callable[[int], bytearray]) -> Callable[[int], bytearray]:
        """Wrap ``AssociationSocket.recv`` of one connection.

        pynetdicom's DUL reads each PDU as ``recv(6)`` (type, reserved, length) and then
        ``recv(length)``; the wrapper sees the header, so it refuses an oversized PDU
        before reading its body, and checks a whole A-ASSOCIATE-RQ before pynetdicom
        parses it. A refusal returns no bytes, which the DUL takes as a closed
        connection (Evt17).
        """
        # pynetdicom alternates: a 6-byte header, then the body of the length it gave
        state: dict[str, int] = {"type": -1}  # -1: the next read is a header

        def refuse(code: str, reason: str, rsd: tuple[int, int, int] | None = None,
                   calling: str | None = None, called: str | None = None) -> bytearray:
            with self._lock:
                conn = self._conns.get(id(assoc))
                if conn is not None:
                    conn.closed = True
            if rsd is not None:
                try:
                    raw.sendall(reject_pdu(rsd))
                except OSError:
                    pass
            _shutdown(raw)
            self.refusals.refuse(address, code, reason, calling_ae=calling, called_ae=called)
            return bytearray()

        def guarded(nr_bytes: int) -> bytearray:
            established = _accepted(assoc)
            if state["type"] < 0:
                data = recv(nr_bytes)
                if len(data) == 6:
                    (length,) = struct.unpack_from(">L", data, 2)
                    limit = (self.config.max_pdu + 6 if established
                             else self.config.max_request_pdu)
                    if length > limit:
                        what = "PDU" if established else "PDU before the association"
                        return refuse("pdu_too_large" if established else
                                      "request_pdu_too_large",
                                      f"a {what} of {length} bytes exceeds the limit of "
                                      f"{limit} (PS3.8 9.3.1)")
                    if established and data[0] == P_DATA_TF:
                        total = self._count_message(assoc, length)
                        if total > self.config.max_message_bytes:
                            return refuse("message_too_large",
                                          f"one message exceeds {self.config.max_message_bytes}"
                                          " bytes while arriving (the instance size limit, "
                                          "LASTMILE_DICOM_MAX_INSTANCE_MB)")
                    state["type"] = data[0]
                return data
            pdu_type, state["type"] = state["type"], -1
            body = recv(nr_bytes)
            if not established and pdu_type == A_ASSOCIATE_RQ and len(body) == nr_bytes:
                pdu = struct.pack(">BBL", A_ASSOCIATE_RQ, 0, nr_bytes) + bytes(body)
                try:
                    check_request(pdu)
                except BadRequest as exc:
                    calling = _printable(pdu[26:42])
                    called = _printable(pdu[10:26])
                    return refuse("malformed_request", exc.reason, exc.rsd, calling, called)
            return body

        return guarded


def _accepted(assoc: Any) -> bool:
    """Whether the A-ASSOCIATE-AC has been sent on this connection.

    pynetdicom sets ``is_established`` only after the EVT_ACCEPTED handlers return (one of
    ours publishes an event and waits for its ack), while its DUL thread has already sent
    the A-ASSOCIATE-AC and reads the requestor's next PDU. The DUL state machine is the
    protocol's own answer: Sta6 ("association established and ready for data transfer",
    PS3.8 9.2) and the release states after it are entered when the AC is sent (AE-7)."""
    if getattr(assoc, "is_established", False):
        return True
    fsm = getattr(getattr(assoc, "dul", None), "state_machine", None)
    return getattr(fsm, "current_state", "Sta1") in _AFTER_ACCEPT


#: PS3.8 9.2 states from "established" on (Sta6; Sta7-Sta12 are the release exchange)
_AFTER_ACCEPT = frozenset({"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"})


def _printable(raw: bytes) -> str | None:
    """An AE title for an event: only when it is plain text (it is no patient value)."""
    text = raw.decode("ascii", "replace").strip()
    return text if text and text.isprintable() and "\ufffd" not in text else None
