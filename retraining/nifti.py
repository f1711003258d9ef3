"""Images and label maps as NIfTI-1 (nibabel), in the layouts training code reads.

- nnU-Net v2 raw dataset: ``Dataset<ID>_<Name>/imagesTr/<case>_0000.nii.gz`` (one
  channel), ``labelsTr/<case>.nii.gz`` (integer label map) and ``dataset.json``
  (``channel_names``, ``labels`` with ``background: 0``, ``numTraining``,
  ``file_ending``), as nnU-Net's dataset format document describes.
- a MONAI datalist (``load_decathlon_datalist``): ``{"training": [{"image", "label",
  ...}]}`` with paths relative to the datalist's folder.

Geometry: the volume's DICOM patient coordinates (LPS, PS3.3 C.7.6.2) are written as
the NIfTI's RAS+ affine (x and y negated), in both the sform and the qform (code 1,
scanner), so that nibabel, SimpleITK and MONAI agree on spacing, origin and direction.
Arrays are stored (x, y, z): column, row, slice. Headers carry nothing but geometry
and data type (no description, no intent name, no file names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from engine.ops.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_ras(volume: Volume) -> np.ndarray:
    """4x4 voxel (x, y, z) -> RAS+ mm affine of ``volume`` (spacing ``(dz, dy, dx)``)."""
    dz, dy, dx = volume.spacing
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(volume.direction[0], float) * dx
    lps[:3, 1] = np.asarray(volume.direction[1], float) * dy
    lps[:3, 2] = np.asarray(volume.direction[2], float) * dz
    lps[:3, 3] = volume.origin
    return LPS_TO_RAS @ lps


def _image(array_zyx: np.ndarray, affine: np.ndarray, dtype: type) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(array_zyx, (2, 1, 0)), dtype),
                          affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_image(volume: Volume, path: Path) -> None:
    """The volume's real-world values (float32) as NIfTI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(_image(volume.array, affine_ras(volume), np.float32), path)


def label_map(masks: Mapping[str, np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """One uint8 (z, y, x) map: 0 background, ``labels[i]`` -> i + 1 (where masks overlap
    the later label wins). A label without a mask stays absent."""
    shape = next(iter(masks.values())).shape
    out = np.zeros(shape, np.uint8)
    for value, label in enumerate(labels, start=1):
        if label in masks:
            out[np.asarray(masks[label], bool)] = value
    return out


def write_label_map(volume: Volume, masks: Mapping[str, np.ndarray], labels: Sequence[str],
                    path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(_image(label_map(masks, labels), affine_ras(volume), np.uint8), path)


def nnunet_dataset_json(*, channel: str, labels: Sequence[str], cases: int) -> dict[str, object]:
    """nnU-Net v2 ``dataset.json`` for one-channel images and ``labels`` (1..n)."""
    return {
        "channel_names": {"0": channel},
        "labels": {"background": 0, **{name: i for i, name in enumerate(labels, start=1)}},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
