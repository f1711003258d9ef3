"""Intensity from the image's own attributes (issue 14 item 4): the range after the
Modality LUT (Bits Stored, Pixel Representation, rescale), and the VOI window."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from demo.phantoms import pelvis_study
from engine.errors import PixelDataError
from engine.ops.preprocess import scale_range
from engine.ops.volume import modality_range, radiograph, voi_image


def _image() -> Dataset:
    return pelvis_study(61, images=1, size=128).datasets[0]


def test_the_range_follows_bits_stored_sign_and_rescale() -> None:
    ds = _image()
    assert modality_range(ds) == (0.0, 4095.0)
    ds.BitsStored, ds.HighBit = 16, 15
    assert modality_range(ds) == (0.0, 65535.0)
    ds.PixelRepresentation = 1
    assert modality_range(ds) == (-32768.0, 32767.0)
    ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 0, -2, 100
    assert modality_range(ds) == (100.0 - 2 * 65535.0, 100.0)


def test_monochrome1_is_inverted_within_the_images_own_range() -> None:
    cr = dcmread(get_testdata_file("RG1_UNCI.dcm"))  # real 15-bit MONOCHROME1 CR
    image = radiograph(cr)
    assert (image.low, image.high) == (0.0, 32767.0) and image.inverted
    assert np.allclose(image.array, 32767.0 - cr.pixel_array.astype(np.float32))
    normalised = scale_range(image.array, low=image.low, high=image.high)
    assert 0.0 < float(normalised.min()) and float(normalised.max()) < 1.0  # not saturated


def test_voi_window_maps_the_window_to_the_full_output() -> None:
    ds = _image()
    ds.WindowCenter, ds.WindowWidth = 1500, 1000
    image = radiograph(ds)
    out, lo, hi = voi_image(image)  # type: ignore[misc]
    scaled = scale_range(out, low=lo, high=hi)
    raw = ds.pixel_array.astype(np.float32)
    assert np.all(scaled[raw <= 1000] == 0.0) and np.all(scaled[raw >= 2000] == 1.0)
    inside = (raw > 1100) & (raw < 1900)
    assert np.all((scaled[inside] > 0) & (scaled[inside] < 1))
    del ds.WindowCenter, ds.WindowWidth
    assert voi_image(radiograph(ds)) is None  # the caller falls back to image_range


def test_colour_radiographs_and_missing_bits_stored_are_refused_in_words() -> None:
    colour = dcmread(get_testdata_file("US1_UNCI.dcm"))
    with pytest.raises(PixelDataError, match="colour images are not supported by this model"):
        radiograph(colour)
    ds = _image()
    del ds.BitsStored
    with pytest.raises(PixelDataError, match=r"BitsStored \(0028,0101\) is missing"):
        radiograph(ds)
