"""Which transfer syntaxes the receiver accepts, in which order, and why.

pynetdicom, as association acceptor, walks *our* list of transfer syntaxes for each
proposed presentation context and takes the first one the requestor also proposed
(``pynetdicom.presentation.negotiate_as_acceptor``): the order of ``PREFERENCE`` is the
order of choice. It is: uncompressed first (every reader decodes them), then lossless
compression, then lossy compression last, so a sender that offers Explicit VR Little
Endian *and* JPEG Baseline in one context sends uncompressed pixels (PS3.5 section 10
and Annex A; PS3.8 section 9.3.2.2).

A syntax is accepted only if this installation can decode its pixel data: uncompressed
syntaxes always, compressed ones when pydicom's pixel-data plugin registry
(``pydicom.pixels.get_decoder(uid).is_available``, PS3.5 Annex A.4) has a working
plugin, which ``decodable_syntaxes()`` asks once at start. The decoders are installed
with Lastmile (pylibjpeg with its libjpeg, openjpeg and rle plugins), so every syntax
below is normally accepted; a syntax whose decoder is missing is refused at association
time (the sender then decompresses, or gets "transfer syntaxes not supported") instead
of being stored with Success and failing later in the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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

log = logging.getLogger(__name__)

#: Native (uncompressed) encodings: pydicom reads their pixel data itself. Deflate
#: compresses the whole dataset losslessly (PS3.5 A.5); it comes after the plain ones
#: because it costs an inflation (bounded by the instance size limit).
UNCOMPRESSED: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
#: Lossless pixel compression (PS3.5 A.4): the decoded pixels equal the original.
LOSSLESS: tuple[str, ...] = (
    JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless, RLELossless,
)
#: Lossy pixel compression: accepted (a sender may hold only lossy data) but chosen last.
LOSSY: tuple[str, ...] = (JPEGLSNearLossless, JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit)

PREFERENCE: tuple[str, ...] = UNCOMPRESSED + LOSSLESS + LOSSY


@dataclass(frozen=True)
class SyntaxSupport:
    """The outcome of the start-up check: what is accepted, and what is not and why."""

    accepted: tuple[str, ...]  # in order of preference
    refused: dict[str, str]  # uid -> reason


def _decoder_reason(uid: str) -> str | None:
    """None when a pixel-data decoder plugin is available for ``uid``, else why not."""
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid)
    except Exception as exc:  # noqa: BLE001 - a registry without this syntax at all
        return f"pydicom has no decoder for it ({type(exc).__name__})"
    if decoder.is_available:
        return None
    missing = "; ".join(decoder.missing_dependencies)
    return "no pixel-data plugin is installed" + (f" ({missing})" if missing else "")


def decodable_syntaxes(candidates: tuple[str, ...] = PREFERENCE) -> SyntaxSupport:
    """Ask pydicom's plugin registry which ``candidates`` decode here (order kept)."""
    accepted: list[str] = []
    refused: dict[str, str] = {}
    for uid in candidates:
        why = None if uid in UNCOMPRESSED else _decoder_reason(uid)
        if why is None:
            accepted.append(uid)
        else:
            refused[uid] = why
    for uid, why in refused.items():
        log.warning("transfer syntax %s is refused: %s (pip install pylibjpeg "
                    "pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle)", uid, why)
    return SyntaxSupport(tuple(accepted), refused)


def is_lossy(uid: str) -> bool:
    return uid in LOSSY
