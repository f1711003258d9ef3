"""Send one study as a modality does: one association, then one C-STORE per file.

Presentation contexts (PS3.8 9.3.2.2, PS3.5 10): for each SOP class of the study, one
context per transfer syntax its files are stored in, plus one proposing Explicit and
Implicit VR Little Endian. A file goes in its own syntax when the receiver accepted it;
otherwise a compressed file is decompressed here (pydicom's pixel decoders) and sent
uncompressed, as ``dcmsend --decompress-lossless`` would, and the file says so. What
cannot be sent is recorded with the reason, never silently dropped.

The C-STORE statuses are PS3.4 Annex B.2.3 and PS3.7 Annex C; each is kept as its code,
its category (Success, Warning, Failure) and its standard name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from sitecheck.folder import DicomFile

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: PS3.8 9.3.2.2: a presentation context ID is an odd number 1..255
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Peer:
    """The receiver to send to (PS3.8 A-ASSOCIATE: called and calling AE titles)."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "LM_CHECK"
    #: ACSE/DIMSE/network timeout: a loaded receiver that fsyncs and waits for its event
    #: log's ack before answering may take long; dcmtk's storescu waits without limit
    timeout_s: float = 120.0


@dataclass(frozen=True)
class FileSent:
    """What happened to one file: a C-STORE status, or why it was not sent."""

    path: str
    sop_instance_uid: str
    status: int | None  # None: not sent (see ``note``)
    category: str  # Success | Warning | Failure | Not sent | Unreadable (here, not sent)
    status_name: str
    sent_syntax: str | None = None
    note: str | None = None  # e.g. "decompressed from JPEG Lossless ..."

    @property
    def accepted(self) -> bool:
        return self.category in ("Success", "Warning")


@dataclass
class StudySent:
    """One association's outcome for one study."""

    study_uid: str
    called_ae: str
    started_at: datetime
    ended_at: datetime
    files: list[FileSent] = field(default_factory=list)
    association: str = "released"  # released | rejected | failed | aborted (mid-way)
    association_note: str | None = None

    @property
    def seconds(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.category] = out.get(f.category, 0) + 1
        return out


def status_name(code: int) -> str:
    """The standard's name of a C-STORE status code (PS3.4 B.2.3, PS3.7 C)."""
    for table in (STORAGE_SERVICE_CLASS_STATUS, GENERAL_STATUS):
        if code in table:
            return table[code][1]
    return f"status 0x{code:04X}"


def requested_contexts(files: Sequence[DicomFile]) -> list[tuple[UID, list[UID]]]:
    """Contexts to propose: per SOP class, each own syntax, then the uncompressed pair."""
    by_class: dict[UID, list[UID]] = {}
    for f in files:
        syntaxes = by_class.setdefault(f.sop_class_uid, [])
        if f.transfer_syntax not in syntaxes and f.transfer_syntax not in UNCOMPRESSED:
            syntaxes.append(f.transfer_syntax)
    contexts: list[tuple[UID, list[UID]]] = []
    for sop_class, own in by_class.items():
        contexts.extend((sop_class, [ts]) for ts in own)
        contexts.append((sop_class, list(UNCOMPRESSED)))
    return contexts


#: a file whose header reads but which cannot be read whole here: nothing to send
UNREADABLE = "the file cannot be read whole"


def _not_sent(f: DicomFile, why: str) -> FileSent:
    category = "Unreadable" if why.startswith(UNREADABLE) else "Not sent"
    return FileSent(str(f.path), f.sop_instance_uid, None, category, "not sent", note=why)


def _prepare(f: DicomFile, accepted: dict[UID, list[UID]]) -> tuple[Dataset | None, str | None]:
    """The dataset to send and a note, or (None, why it cannot be sent)."""
    syntaxes = accepted.get(f.sop_class_uid, [])
    if not syntaxes:
        return None, (f"the receiver accepted no presentation context for "
                      f"{f.sop_class_uid.name}")
    try:
        ds = pydicom.dcmread(f.path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        return None, f"{UNREADABLE} ({type(exc).__name__})"
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        # its header reads, the whole file does not: pixel data cut short
        return None, f"{UNREADABLE}: it ends before its data does (truncated)"
    if not ds.file_meta or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = ds.file_meta or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = f.transfer_syntax
    if f.transfer_syntax in syntaxes:
        return ds, None
    if f.transfer_syntax.is_compressed:
        if not any(ts in UNCOMPRESSED for ts in syntaxes):
            return None, (f"the receiver refused {f.transfer_syntax.name} and accepted no "
                          f"uncompressed syntax for {f.sop_class_uid.name}")
        try:
            ds.decompress()
        except (NotImplementedError, RuntimeError, ValueError, AttributeError,
                KeyError, TypeError) as exc:
            return None, (f"the receiver refused {f.transfer_syntax.name} and this "
                          f"installation cannot decompress it ({type(exc).__name__})")
        return ds, f"decompressed from {f.transfer_syntax.name}: the receiver refused it"
    little_endian = [ts for ts in syntaxes if ts in UNCOMPRESSED]
    if f.transfer_syntax.is_little_endian and little_endian:
        # explicit <-> implicit VR, deflated <-> inflated: pynetdicom re-encodes; within
        # the uncompressed pair that is the receiver's choice, not a refusal
        if f.transfer_syntax in UNCOMPRESSED:
            return ds, None
        return ds, f"re-encoded from {f.transfer_syntax.name}: the receiver refused it"
    return None, (f"the receiver refused {f.transfer_syntax.name} for "
                  f"{f.sop_class_uid.name}; this tool converts only compressed to "
                  f"uncompressed and between little-endian syntaxes")


def send_study(files: Sequence[DicomFile], peer: Peer) -> StudySent:
    """One association for ``files`` (one study); every file gets a ``FileSent``.

    Never raises for the receiver's answers: a rejected or aborted association, a refused
    context or a failure status is recorded per file.
    """
    study_uid = files[0].study_uid if files else ""
    started = datetime.now(UTC)
    result = StudySent(study_uid, peer.called_ae, started, started)
    contexts = requested_contexts(files)
    if len(contexts) > MAX_CONTEXTS:
        why = (f"the study needs {len(contexts)} presentation contexts; one association "
               f"may propose {MAX_CONTEXTS} (PS3.8 9.3.2.2)")
        result.files = [_not_sent(f, why) for f in files]
        result.association = "not attempted"
        result.association_note = why
        result.ended_at = datetime.now(UTC)
        return result
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
    ae.connection_timeout = min(peer.timeout_s, 10.0)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    t0 = time.perf_counter()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae)
    if not assoc.is_established:
        if assoc.is_rejected:
            result.association = "rejected"
            why = f"association rejected by {peer.called_ae} (A-ASSOCIATE-RJ)"
        else:  # pynetdicom reports a refused connection as an abort too
            result.association = "failed"
            why = (f"no association with {peer.called_ae} at {peer.host}:{peer.port} "
                   f"(connection refused, aborted or timed out)")
        result.association_note = why
        result.files = [_not_sent(f, why) for f in files]
        result.ended_at = datetime.now(UTC)
        return result
    accepted: dict[UID, list[UID]] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(UID(str(cx.abstract_syntax)), []).append(
            UID(str(cx.transfer_syntax[0])))
    try:
        for f in files:
            if not assoc.is_established:
                result.association = "aborted"
                result.association_note = "the association ended before every file was sent"
                result.files.append(_not_sent(f, result.association_note))
                continue
            ds, note = _prepare(f, accepted)
            if ds is None:
                result.files.append(_not_sent(f, note or "not sendable"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, AttributeError) as exc:
                result.files.append(_not_sent(f, f"could not be encoded for sending "
                                                 f"({type(exc).__name__})"))
                continue
            if "Status" not in rsp:
                result.files.append(FileSent(str(f.path), f.sop_instance_uid, None,
                                             "Failure", "no response (association aborted "
                                             f"or no answer within {peer.timeout_s:.0f} s)",
                                             note=note))
                continue
            code = int(rsp.Status)
            result.files.append(FileSent(
                str(f.path), f.sop_instance_uid, code, code_to_category(code),
                status_name(code), str(ds.file_meta.TransferSyntaxUID.name), note))
    finally:
        if assoc.is_established:
            assoc.release()
    result.ended_at = datetime.now(UTC)
    log.debug("study %s: %d files in %.2f s", study_uid, len(files), time.perf_counter() - t0)
    return result
