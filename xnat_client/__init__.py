"""The XNAT client session shared by an inbound edge (``ingest.xnat_feedback``) and an
outbound one (``engine.xnat_publisher``): below both, so neither imports the other."""
