"""Site check: send a folder of DICOM to a running Lastmile as a modality would, and read
each study's outcome back from the event log.

A client of Lastmile, not a part of it: it talks DICOM to the receiver (PS3.4 Annex B
Storage, as an SCU) and reads the study's subject of the event log, as ``lastmile audit``
does. Modules:

- ``folder``: which files of a folder are DICOM, grouped by study (headers only);
- ``sender``: one association per study, proposing each file's own transfer syntax plus
  the uncompressed ones (PS3.8 9.3.2.2), decompressing where the receiver refused it;
- ``outcome``: the pure fold from a study's events to its outcome per pipeline;
- ``check``: the whole run (send, then poll each study's history until its outcome is
  final or its deadline passes), and its report as JSON-ready values.
"""
