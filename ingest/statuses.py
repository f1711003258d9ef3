"""Named DICOM statuses and association rejections: never a bare number on the wire.

C-STORE statuses are from PS3.4 Annex B.2.3 (Storage Service Class) and the general
DIMSE statuses of PS3.7 Annex C; association rejections from PS3.8 section 9.3.4
(A-ASSOCIATE-RJ result / source / reason).
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """What we answer to a C-STORE request."""

    SUCCESS = 0x0000
    #: PS3.7 Annex C general status "Failure: Processing failure": our store or the event
    #: log failed, nothing was kept, and the sender should retry.
    PROCESSING_FAILURE = 0x0110
    #: PS3.7 Annex C general status "Failure: Duplicate SOP Instance": the SOP Instance
    #: UID is already stored in another study or series (an identity conflict).
    REFUSED_DUPLICATE_SOP_INSTANCE = 0x0111
    #: PS3.7 general status: the calling AE or its address is not on the allow-list.
    REFUSED_NOT_AUTHORIZED = 0x0124
    #: PS3.4 B.2.3 "A7xx Refused: Out of Resources": free disk below the threshold.
    REFUSED_OUT_OF_RESOURCES = 0xA700
    #: Also in the A7xx family: the dataset is larger than the configured limit.
    REFUSED_DATASET_TOO_LARGE = 0xA701
    #: PS3.4 B.2.3 "A9xx Error: Data Set does not match SOP Class": the dataset's SOP
    #: Class (or Instance) UID differs from the one the association/request named.
    ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: PS3.4 B.2.3 "Cxxx Error: Cannot understand": not DICOM, or truncated.
    ERROR_CANNOT_UNDERSTAND = 0xC000
    #: Cxxx family: a Type 1 UID we need (SOP Instance, Study, Series) is missing.
    ERROR_MISSING_REQUIRED_UID = 0xC001

    @property
    def is_success(self) -> bool:
        return self is StoreStatus.SUCCESS


class AssociationRejection(IntEnum):
    """A-ASSOCIATE-RJ reasons we use, encoded as (result << 16 | source << 8 | reason).

    Use ``rejection.rsd`` for pynetdicom's ``send_reject(result, source, diagnostic)``.
    """

    #: permanent, service-user, "calling-AE-title-not-recognized"
    CALLING_AE_NOT_RECOGNIZED = 0x01_01_03
    #: permanent, service-user, "called-AE-title-not-recognized"
    CALLED_AE_NOT_RECOGNIZED = 0x01_01_07
    #: permanent, service-user, "no-reason-given" (source address not allowed)
    SOURCE_ADDRESS_NOT_ALLOWED = 0x01_01_01
    #: transient, service-provider (presentation), "local-limit-exceeded"
    LOCAL_LIMIT_EXCEEDED = 0x02_03_02

    @property
    def rsd(self) -> tuple[int, int, int]:
        return (self.value >> 16) & 0xFF, (self.value >> 8) & 0xFF, self.value & 0xFF
