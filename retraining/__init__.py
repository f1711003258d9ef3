"""Retraining sets: de-identified DICOM, NIfTI for nnU-Net v2 and MONAI, event tables."""
