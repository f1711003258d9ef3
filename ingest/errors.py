"""One error root for the ingest package; messages say what to do."""

from __future__ import annotations

from dicom_rules.errors import RuleError


class IngestError(Exception):
    """Root of every error raised by ``ingest``."""


class RulesError(IngestError, RuleError):
    """A routing rules file is invalid. The message names the file, line and key."""


class BadInstance(IngestError):
    """A received dataset cannot be accepted; carries the named status to return."""

    def __init__(self, status: int, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code  # a stable name for the kind of refusal, for events
