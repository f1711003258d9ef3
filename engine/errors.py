"""One error root for the engine. Each error names the part that failed and what to do.

``InputError`` subclasses are about the study's data (wrong geometry, a missing slice,
unreadable pixels): retrying the same data cannot help, so the worker records the
failure as final at once. Other ``EngineError``s (a model that raises, a wrong output
shape, a PACS that is down) may be transient and are retried up to the limit.
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error raised by ``engine``."""


class SpecError(EngineError):
    """A pipeline file is invalid; the message has the file, line and key."""


class ModelIntegrityError(EngineError):
    """A model file is missing or its SHA-256 differs from the pipeline file's."""


class RuntimeUnavailable(EngineError):
    """The requested inference runtime cannot run on this host (and why)."""


class InputError(EngineError):
    """The study's data cannot be processed as it is (not worth retrying)."""


class GeometryError(InputError):
    """Slices of a series disagree in orientation, spacing or size, or a slice is missing."""


class PixelDataError(InputError):
    """Pixel data cannot be decoded (unsupported transfer syntax, truncated data)."""


class ModelOutputError(EngineError):
    """The model returned something other than what the pipeline file declares."""


class ModelFailed(EngineError):
    """The runtime raised while running the model."""


class PublishFailedError(EngineError):
    """A result could not be delivered (the destination refused or is unreachable)."""


class OperatorError(EngineError):
    """An operator failed: wraps the cause with the operator's name."""

    def __init__(self, operator: str, cause: BaseException) -> None:
        self.operator = operator
        self.cause = cause
        super().__init__(f"{operator}: {type(cause).__name__}: {cause}")

    @property
    def is_input_error(self) -> bool:
        return isinstance(self.cause, InputError)
