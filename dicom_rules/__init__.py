"""The rule language on DICOM tags (typed conditions, their evaluation and their YAML form)
that routing (``ingest.rules``) uses and pipeline selection will use: below both."""
