"""Which Storage SOP Classes the receiver offers, and why (PS3.4 Annex B, PS3.6 Annex A).

pynetdicom's ``StoragePresentationContexts`` lists 120 abstract syntaxes, but 14 of them
are retired SOP Classes that pynetdicom binds to no service class
(``pynetdicom.sop_class.uid_to_service_class`` answers the base ``ServiceClass``): a
receiver that offers them accepts the context, then its C-STORE request finds no
handler and is never answered (seen with the retired Ultrasound Image Storage objects of
pydicom-data, ``color-pl.dcm`` and ``color-px.dcm``: no status, no event).

Two kinds among them:

- Retired *image* Storage SOP Classes (``RETIRED_IMAGE_STORAGE``): still written by old
  ultrasound, nuclear-medicine and angiography equipment and held in archives that sites
  migrate. They are images with the same Image Pixel module as their successors, so they
  are registered as Storage (``register_retired_image_storage``) and received like any
  other instance; pipelines then decide by their input contract.
- Retired non-image objects (Stored Print, Hardcopy, Standalone Overlay/Curve/LUT,
  Standalone PET Curve): no pipeline reads them. They are not offered: the sender's
  presentation context is rejected during negotiation ("abstract syntax not supported",
  PS3.8 9.3.3.2) and the association's ``opened`` event names the refused context.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from pydicom.uid import UID
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

#: Retired image Storage SOP Classes (PS3.6 Annex A, "Retired") -> a keyword for pynetdicom.
RETIRED_IMAGE_STORAGE: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.5": "NuclearMedicineImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.12.3": "XRayAngiographicBiPlaneImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.77.1": "VLImageStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.77.2": "VLMultiFrameImageStorageTrialRetired",
}

_registered = threading.Lock()


def register_retired_image_storage() -> None:
    """Bind the retired image SOP Classes to pynetdicom's Storage service (idempotent)."""
    with _registered:
        for uid, keyword in RETIRED_IMAGE_STORAGE.items():
            if not issubclass(uid_to_service_class(uid), StorageServiceClass):
                register_uid(uid, keyword, StorageServiceClass)


def offered_storage_classes() -> tuple[str, ...]:
    """The Storage SOP Class UIDs the receiver offers: every one of pynetdicom's storage
    contexts that has a Storage service class once the retired image classes are
    registered (PS3.4 B.5); the retired non-image objects are left out."""
    register_retired_image_storage()
    offered: list[str] = []
    for cx in StoragePresentationContexts:
        uid = cx.abstract_syntax
        assert uid is not None
        if issubclass(uid_to_service_class(uid), StorageServiceClass):
            offered.append(str(uid))
    return tuple(offered)


#: PS3.8 9.3.3.2, presentation context item "Result/Reason" of the A-ASSOCIATE-AC
CONTEXT_RESULT: dict[int, str] = {
    0x01: "user rejection",
    0x02: "no reason (provider rejection)",
    0x03: "abstract syntax not supported",
    0x04: "transfer syntaxes not supported",
}


def refused_contexts(rejected: Iterable[Any]) -> tuple[str, ...]:
    """"SOP Class name: reason" for each rejected presentation context (pynetdicom's
    ``Association.rejected_contexts``), without repeats, in the order proposed."""
    out: dict[str, None] = {}
    for cx in rejected:
        uid = UID(str(cx.abstract_syntax or ""))
        name = uid.name if uid.is_valid else "an invalid SOP Class UID"
        out[f"{name}: {CONTEXT_RESULT.get(int(cx.result or 0x02), 'rejected')}"] = None
    return tuple(out)
