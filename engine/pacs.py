"""Publishing results to a PACS by C-STORE (pynetdicom): per object, refused or sent.

Blocking (pynetdicom is synchronous): the worker calls it in a thread. Every status is
named (PS3.4 Annex B.2.3), never a bare number.

A PACS decides per object, and so does this module:

- Each SOP class is proposed in its own presentation context; after the association
  is negotiated, an object whose class the PACS did not accept is **refused** (no
  presentation context, PS3.8 9.3.2.2) and the others are still sent: a PACS that
  takes no Segmentation still gets the SR.
- A C-STORE answered with a status PS3.4 gives as a refusal of *this* object
  (``PERMANENT``: 0x0122 SOP Class Not Supported, 0x0124 Not Authorized, 0x0117
  Invalid SOP Instance, 0xA7xx Refused: Out of Resources, 0xA9xx Data Set Does Not
  Match SOP Class, 0xCxxx Cannot Understand) is **refused**, final: sending the same
  bytes again would be answered the same way.
- An association rejected permanently (A-ASSOCIATE-RJ result 1, PS3.8 9.3.4: e.g. an
  unknown called AE title) refuses every object.
- Everything else (no answer, connection refused, aborted, rejected transiently, a
  status such as 0x0110 Processing Failure) is **unreachable**: retried here a few
  times, then raised as ``PublishFailedError`` carrying what was already decided, and
  retried later from the log (``engine.pacs_redelivery``).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from engine.errors import PublishFailedError

STATUS_SUCCESS = 0x0000
#: no status: the PACS accepted no presentation context for the object's SOP class
NO_CONTEXT = -1
#: no status: the association was rejected permanently (A-ASSOCIATE-RJ result 1)
ASSOCIATION_REJECTED = -2
_PERMANENT_CODES = frozenset({0x0117, 0x0122, 0x0124, 0x0211, 0x0212})


def is_permanent(code: int) -> bool:
    """True for C-STORE failure statuses that refuse the object itself (module doc)."""
    return (code in _PERMANENT_CODES or code & 0xFF00 in (0xA700, 0xA900)
            or code & 0xF000 == 0xC000)


def status_name(code: int) -> str:
    """'Success', 'Warning: Coercion of data elements', 'Failure: Out of resources' ..."""
    if code == NO_CONTEXT:
        return "Refused: SOP class not accepted (no presentation context)"
    if code == ASSOCIATION_REJECTED:
        return "Refused: association rejected permanently"
    entry = STORAGE_SERVICE_CLASS_STATUS.get(code)
    category = code_to_category(code)
    return f"{category}: {entry[1]}" if entry else f"{category} (0x{code:04X})"


@dataclass(frozen=True)
class PacsAddress:
    ae_title: str
    host: str
    port: int
    calling_ae: str = "LASTMILE"


def format_address(dest: PacsAddress) -> str:
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def parse_address(text: str, calling_ae: str = "LASTMILE") -> PacsAddress:
    """``AE@host:port`` (what ``PublishFailed.address`` holds) back to an address."""
    ae, _, rest = text.partition("@")
    host, _, port = rest.rpartition(":")
    if not ae or not host or not port.isdigit():
        raise ValueError(f"not a PACS address (AE@host:port): {text!r}")
    return PacsAddress(ae, host, int(port), calling_ae)


def tls_args(host: str) -> tuple[ssl.SSLContext, str] | None:
    """DICOM TLS to the PACS (PS3.15 B.1), from ``LASTMILE_PACS_TLS_CA`` (verify the PACS;
    unset = the system's CAs), ``LASTMILE_PACS_TLS_CERT`` and ``_KEY`` (our certificate,
    for a PACS that requires one). None when none of them is set: plain TCP."""
    ca, cert, key = (os.environ.get(f"LASTMILE_PACS_TLS_{k}") or None
                     for k in ("CA", "CERT", "KEY"))
    if not (ca or cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx, host


@dataclass(frozen=True)
class StoreOutcome:
    """What the PACS decided about one object: stored (``refused`` False) or refused."""

    sop_instance_uid: str
    attempt: int
    status: str  # named (status_name)
    code: int = STATUS_SUCCESS  # the DICOM status, or NO_CONTEXT / ASSOCIATION_REJECTED
    refused: bool = False

    @property
    def status_hex(self) -> str:
        return f"0x{self.code:04X}" if self.code >= 0 else "none"


class _Unreachable(Exception):
    def __init__(self, reason: str, decided: list[StoreOutcome] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decided = list(decided or [])


def _send_once(ds_list: Sequence[Dataset], dest: PacsAddress, timeout_s: float,
               attempt: int) -> list[StoreOutcome]:
    """One association: an outcome per object, or ``_Unreachable`` with those decided."""
    where = format_address(dest)
    ae = AE(ae_title=dest.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in ds_list}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    rejection: list[int] = []

    def on_acse(event: evt.Event) -> None:
        result = getattr(getattr(event, "primitive", None), "result", None)
        if result in (0x01, 0x02):
            rejection.append(int(result))

    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
                         tls_args=tls_args(dest.host))
    if not assoc.is_established:
        if rejection == [0x01]:
            return [StoreOutcome(str(ds.SOPInstanceUID), attempt,
                                 status_name(ASSOCIATION_REJECTED), ASSOCIATION_REJECTED,
                                 refused=True) for ds in ds_list]
        if assoc.rejected_contexts and not assoc.accepted_contexts and not rejection:
            # negotiated, but no context accepted at all: every class refused
            return [StoreOutcome(str(ds.SOPInstanceUID), attempt, status_name(NO_CONTEXT),
                                 NO_CONTEXT, refused=True) for ds in ds_list]
        why = "rejected the association for now" if rejection else \
            "refused the connection or did not answer"
        raise _Unreachable(f"{where} {why}")
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    decided: list[StoreOutcome] = []
    transient: list[str] = []
    try:
        for ds in ds_list:
            uid = str(ds.SOPInstanceUID)
            if str(ds.SOPClassUID) not in accepted:
                decided.append(StoreOutcome(uid, attempt, status_name(NO_CONTEXT), NO_CONTEXT,
                                            refused=True))
                continue
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError, OSError):
                raise _Unreachable(f"{where}: the association ended while sending",
                                   decided) from None
            if not status or "Status" not in status:
                raise _Unreachable(f"{where}: no C-STORE response (timeout or abort)",
                                   decided)
            code = int(status.Status)
            name = status_name(code)
            if code_to_category(code) in ("Success", "Warning"):
                decided.append(StoreOutcome(uid, attempt, name, code))
            elif is_permanent(code):
                decided.append(StoreOutcome(uid, attempt, name, code, refused=True))
            else:  # this object may go next time; the others are still sent now
                transient.append(f"{where} answered {name} (0x{code:04X})")
    finally:
        if assoc.is_established:
            assoc.release()
    if transient:
        raise _Unreachable("; ".join(dict.fromkeys(transient)), decided)
    return decided


def c_store(
    datasets: Sequence[Dataset],
    dest: PacsAddress,
    *,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    timeout_s: float = 30.0,
    on_retry: Callable[[int, str], None] | None = None,
) -> list[StoreOutcome]:
    """Send ``datasets``: one outcome per object, stored or refused (module doc).

    Objects neither stored nor refused are tried again, up to ``retries`` more
    associations (re-sending is harmless: same SOP Instance UID, same bytes). If some
    are still undecided, raises ``PublishFailedError`` whose ``outcomes`` holds what
    was decided; its message says "unreachable", never "refused".
    """
    done: dict[str, StoreOutcome] = {}
    todo = list(datasets)
    last = ""
    for attempt in range(1, retries + 2):
        try:
            for o in _send_once(todo, dest, timeout_s, attempt):
                done[o.sop_instance_uid] = o
        except _Unreachable as exc:
            for o in exc.decided:
                done[o.sop_instance_uid] = o
            last = exc.reason
        except (OSError, RuntimeError) as exc:
            last = f"{format_address(dest)} unreachable ({type(exc).__name__})"
        todo = [ds for ds in todo if str(ds.SOPInstanceUID) not in done]
        if not todo:
            return [done[str(ds.SOPInstanceUID)] for ds in datasets]
        if on_retry is not None and attempt <= retries:
            on_retry(attempt, last)
        if attempt <= retries:
            time.sleep(retry_delay_s * attempt)
    raise PublishFailedError(
        f"PACS unreachable: {last} ({len(todo)} object(s) not delivered after "
        f"{retries + 1} attempts)",
        [done[str(ds.SOPInstanceUID)] for ds in datasets if str(ds.SOPInstanceUID) in done])
