"""One error root for the events package; messages say what to do."""


class EventsError(Exception):
    """Root of every error raised by ``events``."""


class ConfigError(Exception):
    """A configuration problem, with the file, line and key (or environment variable) when
    known. Not an ``EventsError``: every part's settings raise it, the command line exits 3."""


class Unprocessable(Exception):  # noqa: N818 - a verdict, raised by handlers
    """A consumer's handler says retrying cannot help (the input itself is wrong): the
    message is dead-lettered on this delivery instead of after ``max_attempts``."""


class EditRejected(Unprocessable):
    """An edited (corrected) segmentation cannot be accepted or compared with the AI result;
    the message says why, in our words with the attribute's keyword. Raised where the
    upload is checked (the review pages) and where the edit is recomputed (the engine,
    which dead-letters the edit on its first delivery: retrying cannot help)."""


class CodecError(EventsError):
    """Bytes on a subject are not a valid Lastmile event (not our codec, unknown type,
    failed validation, or written by a newer version). The message is the reason."""


class BusUnavailable(EventsError):
    """The NATS server cannot be reached or did not acknowledge in time."""


class PublishError(EventsError):
    """JetStream refused or did not acknowledge a publish within the retry budget."""


class StoreError(EventsError):
    """The instance store could not make a file durable (disk, permissions)."""


class OutOfSpace(StoreError):
    """Free disk space is below the configured threshold; new data is refused."""
