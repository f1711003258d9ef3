"""Publishing results to a PACS by C-STORE (pynetdicom), with retries.

Blocking (pynetdicom is synchronous): the worker calls it in a thread. Every status is
named (PS3.4 Annex B.2.3), never a bare number.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from engine.errors import PublishFailedError

STATUS_SUCCESS = 0x0000


def status_name(code: int) -> str:
    """'Success', 'Warning: Coercion of data elements', 'Failure: Out of resources' ..."""
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
    sop_instance_uid: str
    attempt: int
    status: str


def _send_once(ds_list: Sequence[Dataset], dest: PacsAddress, timeout_s: float) -> list[str]:
    ae = AE(ae_title=dest.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in ds_list}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=tls_args(dest.host))
    if not assoc.is_established:
        raise PublishFailedError(
            f"{dest.ae_title}@{dest.host}:{dest.port} refused or did not answer the association"
        )
    names = []
    try:
        for ds in ds_list:
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise PublishFailedError(
                    f"{dest.ae_title}: no C-STORE response for {ds.SOPInstanceUID} (timeout)")
            code = int(status.Status)
            name = status_name(code)
            if code_to_category(code) not in ("Success", "Warning"):
                raise PublishFailedError(f"{dest.ae_title} answered {name} for "
                                         f"{ds.SOPInstanceUID}")
            names.append(name)
    finally:
        assoc.release()
    return names


def c_store(
    datasets: Sequence[Dataset],
    dest: PacsAddress,
    *,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    timeout_s: float = 30.0,
    on_retry: Callable[[int, str], None] | None = None,
) -> list[StoreOutcome]:
    """Send all ``datasets`` on one association; on failure retry the whole batch
    (re-sending an instance is harmless: same SOP Instance UID, same bytes)."""
    last: PublishFailedError | None = None
    for attempt in range(1, retries + 2):
        try:
            names = _send_once(datasets, dest, timeout_s)
            return [StoreOutcome(str(ds.SOPInstanceUID), attempt, n)
                    for ds, n in zip(datasets, names, strict=True)]
        except PublishFailedError as exc:
            last = exc
        except (OSError, RuntimeError) as exc:
            last = PublishFailedError(f"{dest.ae_title}@{dest.host}:{dest.port}: {exc}")
        if on_retry is not None and attempt <= retries:
            on_retry(attempt, str(last))
        if attempt <= retries:
            time.sleep(retry_delay_s * attempt)
    assert last is not None
    raise PublishFailedError(f"{last} (after {retries + 1} attempts)")
