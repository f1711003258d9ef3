"""One error root for the projections package; messages say what to do."""


class ProjectionsError(Exception):
    """Root of every error raised by ``projections``."""


class StoreBusy(ProjectionsError):
    """The DuckDB file is locked by another process for longer than we were willing to wait."""


class StoreError(ProjectionsError):
    """The read-model database could not be written; nothing of the batch was applied."""
