"""What comes IN as events: the DICOM Storage SCP, the durable instance store,
routing rules and study-completion detection.

Pure cores: ``rules`` (routing and manifest conditions, parsed from YAML with line
numbers), ``completion`` (the study-completion fold), ``dataset`` (structure check, file
meta and the facts events may carry), ``receiver`` (what one C-STORE becomes), and
``statuses`` (named DICOM statuses). Edges, named after what they talk to: ``store``
(the file system), ``rules_file`` (the rules file on disk), ``dicom_scp`` (pynetdicom
associations), ``jetstream`` (publishing from SCP threads, folding the log, the
completion detector), ``peers`` (dcmtk and Orthanc processes for tests and the bench).
``app`` puts the running parts together; ``bench`` is ``lastmile bench ingest``.
"""
