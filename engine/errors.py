"""One error root for the engine, and the taxonomy the worker decides retries by.

Two kinds of failure, told apart at the operator boundary (``engine.steps.run_steps``):

- **final**: anything a pure step raises on the study's bytes (``InputError`` and its
  subclasses, a ``ValueError`` from pydicom or highdicom, a model output that does not
  fit the pipeline file). The same bytes fail the same way every time, so the worker
  records ``inference failed`` with ``final=true`` at the first attempt and never runs
  the model again on them.
- **retryable**: an edge that may work on the next attempt (``EdgeError``): the event
  log, the disk (``OSError``), a network peer (PACS, XNAT), the inference runtime or
  its device (``ModelFailed``, ``RuntimeUnavailable``), memory. Retried up to the
  worker's limit, then dead-lettered.

Reasons that reach events and logs are built by ``safe_reason``: our own words plus
the attribute's keyword and tag, never the text of a third-party exception (pydicom
and highdicom quote values, e.g. a patient's birth date).
"""

from __future__ import annotations

import re
from typing import Any


class EngineError(Exception):
    """Root of every error raised by ``engine``."""


class EdgeError(EngineError):
    """An edge failed (event log, disk, network peer, runtime device): worth retrying."""


class SpecError(EngineError):
    """A pipeline file is invalid; the message has the file, line and key."""


class ModelIntegrityError(EdgeError):
    """A model file is missing or its SHA-256 differs from the pipeline file's (this
    host's disk, not the study: retried, another worker may hold the right file)."""


class RuntimeUnavailable(EdgeError):
    """The requested inference runtime cannot run on this host (and why)."""


class InputError(EngineError):
    """The study's data cannot be processed as it is (not worth retrying).

    Its message is ours and names attributes by keyword and tag, never by value.
    """


class ContractError(InputError):
    """The input is outside what the pipeline's model was validated on (its contract)."""


class GeometryError(InputError):
    """Slices of a series disagree in orientation, spacing or size, or a slice is missing."""


class PixelDataError(InputError):
    """Pixel data cannot be decoded (unsupported transfer syntax, truncated data)."""


class ModelOutputError(EngineError):
    """The model returned something other than what the pipeline file declares."""


class ModelFailed(EdgeError):
    """The runtime raised while running the model (device memory, driver: retried)."""


class PublishFailedError(EdgeError):
    """Results could not be delivered: the destination is unreachable. ``outcomes``
    holds what it did decide before (objects stored or refused, ``engine.pacs``)."""

    def __init__(self, message: str, outcomes: list[Any] | None = None) -> None:
        super().__init__(message)
        self.outcomes: list[Any] = list(outcomes or [])


class PriorFetchError(EdgeError):
    """The PACS could not be asked for a patient's earlier studies, or did not send one
    (``engine.pacs_priors``): infrastructure, retried with a bound. "The PACS holds no
    earlier study" is not this error but an answer."""


class OperatorError(EngineError):
    """An operator failed: the operator's name, the series, and a reason safe to record.

    ``final`` is the taxonomy's verdict (module doc); ``str()`` never contains the
    text of a third-party exception.
    """

    def __init__(self, operator: str, cause: BaseException, series_uid: str | None = None
                 ) -> None:
        self.operator = operator
        self.cause = cause
        self.series_uid = series_uid
        where = f" (series {series_uid})" if series_uid else ""
        super().__init__(f"{operator}{where}: {safe_reason(cause)}")

    @property
    def final(self) -> bool:
        return not is_retryable(self.cause)

    @property
    def is_input_error(self) -> bool:
        return self.final


def is_retryable(exc: BaseException) -> bool:
    """True for edges (``EdgeError``, ``OSError``, ``MemoryError``, timeouts); False for
    everything a pure step raises on the input (module doc)."""
    if isinstance(exc, OperatorError):
        return is_retryable(exc.cause)
    if isinstance(exc, InputError):
        return False
    return isinstance(exc, EdgeError | OSError | MemoryError | TimeoutError)


# words that look like keywords in messages but say nothing about an attribute
_NOT_ATTRIBUTES = {"Dataset", "DataElement", "Sequence", "None", "True", "False", "Error",
                   "Value", "Warning", "Segmentation", "Comprehensive3DSR", "Volume"}
_WORD = re.compile(r"\b([A-Z][A-Za-z0-9]{2,})\b")
_TAG = re.compile(r"\(?\s*(?:0x)?([0-9A-Fa-f]{4})\s*,\s*(?:0x)?([0-9A-Fa-f]{4})\s*\)?")


def attributes_named(text: str) -> list[str]:
    """DICOM attributes a message mentions, as ``Keyword (gggg,eeee)``, in order."""
    from pydicom.datadict import keyword_for_tag, tag_for_keyword

    found: list[str] = []
    for word in _WORD.findall(text):
        tag = tag_for_keyword(word) if word not in _NOT_ATTRIBUTES else None
        if tag is not None:
            found.append(f"{word} ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    for group, element in _TAG.findall(text):
        tag = int(group + element, 16)
        keyword = keyword_for_tag(tag)
        if keyword:
            found.append(f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    return list(dict.fromkeys(found))


def safe_reason(exc: BaseException) -> str:
    """A reason for ``exc`` that may be recorded: our own message for engine errors;
    for any other exception its type, the library it came from and the DICOM
    attributes its message names (keyword and tag), never the message itself."""
    if isinstance(exc, OperatorError):
        return str(exc)
    if isinstance(exc, EngineError):
        return f"{type(exc).__name__}: {exc}"
    kind = type(exc).__name__
    library = type(exc).__module__.split(".")[0]
    tb = exc.__traceback__
    while tb is not None:  # the first library our code called into
        top = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        if top and top not in ("engine", "builtins", "asyncio", "concurrent", "threading",
                                "__main__", "tests"):
            library = top
            break
        tb = tb.tb_next
    source = f" in {library}" if library not in ("builtins", "") else ""
    names = attributes_named(str(exc))
    about = (f" concerning {', '.join(names)}" if names
             else " (no attribute named)")
    return f"{kind}{source}{about}; the value is not recorded"


def quiet_value_warnings() -> None:
    """Stop pydicom from warning about (and logging) non-conformant values as it reads
    them: its messages quote the value. The engine checks the values it uses itself
    (``engine.result_sources``) and names attributes, not values. Process-wide."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
