"""Lastmile's own review pages (used when no XNAT is configured, or beside it): sign-in
and roles, the reader's worklist, the case view (the PACS deep link), the HFD QC gate,
blinded multi-reader reading (LTS) and corrected-segmentation upload."""
