"""NATS subjects: ``lm.ev.<study token>.<event type>``.

The study token is the first 16 hex digits of SHA-256 of the Study Instance UID
(UIDs contain dots, which NATS treats as token separators). Events without a
study (a pipeline deployed, a drift alert) use ``_``. So:

- one study's history:   ``lm.ev.<token>.>``   (what ``lastmile audit`` reads)
- one event type:        ``lm.ev.*.ingest.study.completed``
- everything:            ``lm.ev.>``
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

PREFIX = "lm.ev"
ALL_EVENTS = f"{PREFIX}.>"
NO_STUDY = "_"


@lru_cache(maxsize=65536)
def study_token(study_uid: str | None) -> str:
    if not study_uid:
        return NO_STUDY
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:16]


def subject_for(type_name: str, study_uid: str | None) -> str:
    return f"{PREFIX}.{study_token(study_uid)}.{type_name}"


def study_filter(study_uid: str | None) -> str:
    return f"{PREFIX}.{study_token(study_uid)}.>"


def type_filter(type_name: str) -> str:
    return f"{PREFIX}.*.{type_name}"
