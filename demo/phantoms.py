"""Synthetic phantoms: brain MR with lesions, abdomen CT with two liver lobes and vessels,
pelvis radiographs with hips (normal, fracture, hardware), as arrays and as DICOM studies.

Why: the reference pipelines need models that really learn and tests that know the
truth. Every phantom is generated from a seed, so the same seed gives the same study,
and its ground truth (label maps, volumes in mL, hip classes and boxes) comes with it.
The DICOM studies carry plausible tags, including *fake* patient names, IDs, birth
dates and ages, so that pseudonymisation downstream can be tested.

Array convention everywhere in the engine: volumes are ``(z, y, x)``; spacing is
``(dz, dy, dx)`` in mm; the first slice is the most inferior (lowest z).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"

# label values of the phantoms' ground truth
BTS_LABELS = {1: "lesion"}
LTS_LABELS = {1: "left_lobe", 2: "right_lobe", 3: "vessels"}
HIP_CLASSES = ("normal", "fracture", "hardware")
HIP_SIDES = ("right", "left")  # image left = patient right (radiological convention)

_FIRST = ("Ada", "Ben", "Carla", "Dmitri", "Eva", "Farid", "Greta", "Hugo", "Ines", "Jonas")
_LAST = ("Fakename", "Testperson", "Phantomova", "Synthetik", "Dummy", "Mustermann")


def _uid(rng: np.random.Generator) -> str:
    """A deterministic UID under 2.25 (a UUID-derived root needs no registration)."""
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


# --------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class FakePatient:
    """An invented patient. Names and IDs are obviously synthetic on purpose."""

    name: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str

    def age_on(self, study_date: str) -> str:
        b = date(int(self.birth_date[:4]), int(self.birth_date[4:6]), int(self.birth_date[6:]))
        s = date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:]))
        years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
        return f"{years:03d}Y"


def fake_patient(seed: int) -> FakePatient:
    rng = np.random.default_rng(seed + 7919)
    first = _FIRST[int(rng.integers(len(_FIRST)))]
    last = _LAST[int(rng.integers(len(_LAST)))]
    born = date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 60)))
    return FakePatient(
        name=f"{last}^{first}",
        patient_id=f"FAKE{seed:06d}",
        birth_date=born.strftime("%Y%m%d"),
        sex="F" if rng.random() < 0.5 else "M",
    )


# --------------------------------------------------------------------------- arrays


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Physical coordinates (mm) of voxel centres, centred on the volume."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    return tuple(np.meshgrid(*axes, indexing="ij"))


def sphere_volume_ml(radius_mm: float) -> float:
    return 4.0 / 3.0 * np.pi * radius_mm**3 / 1000.0


def brain_mr_arrays(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (40, 128, 128),
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5),
    lesion_radius_mm: float | None = None,
    lesion_centre_mm: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like T2/FLAIR volume (uint16) and its lesion label map (0/1).

    Head = ellipsoid with a skull rim, brain with grey/white texture, ventricles
    darker, and one bright spherical lesion (radius 6-22 mm unless given).
    """
    z, y, x = _grid(shape, spacing)
    head = (z / 66.0) ** 2 + (y / 88.0) ** 2 + (x / 74.0) ** 2
    brain = (z / 60.0) ** 2 + (y / 82.0) ** 2 + (x / 68.0) ** 2 <= 1.0
    skull = (head <= 1.0) & ~brain
    img = np.zeros(shape, np.float32)
    img[skull] = 180.0
    img[brain] = 420.0 + 60.0 * np.sin(x[brain] / 7.0) * np.cos(y[brain] / 9.0)
    vent = ((z / 25.0) ** 2 + (y / 30.0) ** 2 + ((np.abs(x) - 9.0) / 7.0) ** 2) <= 1.0
    img[vent & brain] = 300.0
    r = float(lesion_radius_mm if lesion_radius_mm is not None else rng.uniform(6.0, 22.0))
    if lesion_centre_mm is None:
        # inside the brain, away from its edge
        c = np.array([rng.uniform(-25, 25), rng.uniform(-45, 45), rng.uniform(-35, 35)])
    else:
        c = np.asarray(lesion_centre_mm, float)
    # slightly irregular lesion: a sphere with a low-frequency bump
    d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    lesion = (d <= r) & brain
    img[lesion] = 820.0 + 40.0 * np.cos((y[lesion] - c[1]) / 4.0)
    img += rng.normal(0.0, 25.0, shape).astype(np.float32)
    img = np.clip(img, 0, 4095).astype(np.uint16)
    return img, lesion.astype(np.uint8)


def abdomen_ct_arrays(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (40, 96, 96),
    spacing: tuple[float, float, float] = (5.0, 4.0, 4.0),
) -> tuple[np.ndarray, np.ndarray]:
    """An abdomen-like CT (int16 HU) and labels 1 left lobe, 2 right lobe, 3 vessels.

    The liver is an ellipsoid on the patient's right (image left) split by a fissure
    plane; the left lobe is slightly less dense than the right (a synthetic cue the
    model card states), contrast-filled vessels (about 180 HU) branch through both.
    """
    z, y, x = _grid(shape, spacing)
    hu = np.full(shape, -1000.0, np.float32)
    body = (y / 150.0) ** 2 + (x / 180.0) ** 2 <= 1.0
    hu[body] = -80.0  # fat
    muscle = body & ((y / 140.0) ** 2 + (x / 170.0) ** 2 > 0.85)
    hu[muscle] = 45.0
    spine = ((y - 100.0) / 22.0) ** 2 + (x / 20.0) ** 2 <= 1.0
    hu[spine] = 600.0
    cx, cy, cz = rng.uniform(-70, -50), rng.uniform(-20, 10), rng.uniform(-10, 10)
    ax, ay, az = rng.uniform(85, 105), rng.uniform(60, 75), rng.uniform(60, 80)
    liver = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0
    # fissure: an oblique plane; the patient's left (image right, +x) part is the left lobe
    tilt = rng.uniform(-0.3, 0.3)
    plane = (x - (cx + 25.0)) + tilt * (y - cy)
    left = liver & (plane > 4.0)
    right = liver & (plane < -4.0)
    hu[liver] = 40.0  # fissure tissue
    hu[left] = 58.0
    hu[right] = 85.0
    labels = np.zeros(shape, np.uint8)
    labels[left] = 1
    labels[right] = 2
    # vessels: a trunk and two branches (tubes of radius ~7 mm) inside the liver
    vessels = np.zeros(shape, bool)
    trunk_y = cy + rng.uniform(-10, 10)
    for dx_, dy_ in ((1.0, 0.0), (0.7, 0.6), (0.7, -0.6)):
        t = ((x - cx) * dx_ + (y - trunk_y) * dy_) / np.hypot(dx_, dy_)
        px = cx + t * dx_ / np.hypot(dx_, dy_)
        py = trunk_y + t * dy_ / np.hypot(dx_, dy_)
        dist = np.sqrt((x - px) ** 2 + (y - py) ** 2)
        vessels |= (dist <= 7.0) & (np.abs(z - cz) <= az * 0.7)
    vessels &= liver
    hu[vessels] = 185.0
    labels[vessels] = 3
    hu += rng.normal(0.0, 8.0, shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16), labels


@dataclass(frozen=True)
class HipTruth:
    side: str  # "right" | "left" (patient side)
    classification: str  # normal | fracture | hardware
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def pelvis_radiograph(
    rng: np.random.Generator,
    size: int = 1024,
    classes: tuple[str, str] | None = None,
) -> tuple[np.ndarray, tuple[HipTruth, HipTruth]]:
    """A pelvis AP radiograph (uint16, 12 bit) with two hips and their classes.

    Each hip is a femoral head (disc) with a neck and shaft; a fracture is a dark
    line across the neck with a small offset, hardware a very bright screw/nail
    along the neck. Boxes enclose head and neck.
    """
    if classes is None:
        classes = (
            HIP_CLASSES[int(rng.integers(3))],
            HIP_CLASSES[int(rng.integers(3))],
        )
    s = size / 128.0  # geometry is drawn in 128-px units, scaled
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / s
    img = np.full((size, size), 300.0, np.float32)
    shift_x, shift_y = rng.uniform(-8, 8), rng.uniform(-8, 8)
    pcx, pcy = 64 + shift_x, 52 + shift_y
    # soft tissue and pelvic ring
    img += 500.0 * (((xx - pcx) / 62) ** 2 + ((yy - pcy - 10) / 70) ** 2 <= 1.0)
    ring = ((xx - pcx) / 44) ** 2 + ((yy - pcy) / 30) ** 2
    img += 900.0 * ((ring <= 1.0) & (ring >= 0.6))
    truths = []
    for i, side in enumerate(HIP_SIDES):
        sign = -1.0 if side == "right" else 1.0  # patient right = image left
        hx = pcx + sign * rng.uniform(30, 36)
        hy = pcy + rng.uniform(20, 26)
        hr = rng.uniform(7.0, 9.0)
        head = (xx - hx) ** 2 + (yy - hy) ** 2 <= hr**2
        # neck from head down and outwards, then the shaft
        nx, ny = hx + sign * 10.0, hy + 12.0
        seg2 = (nx - hx) ** 2 + (ny - hy) ** 2
        t = np.clip(((xx - hx) * (nx - hx) + (yy - hy) * (ny - hy)) / seg2, 0, 1)
        dist = np.hypot(xx - (hx + t * (nx - hx)), yy - (hy + t * (ny - hy)))
        neck = dist <= 4.5
        shaft = (np.abs(xx - nx) <= 5.5) & (yy >= ny) & (yy <= ny + 40)
        bone = head | neck | shaft
        img[bone] += 1100.0
        cls = classes[i]
        if cls == "fracture":
            # a dark line across the neck at its middle, perpendicular to it
            mx, my = (hx + nx) / 2, (hy + ny) / 2
            ux, uy = (nx - hx), (ny - hy)
            norm = np.hypot(ux, uy)
            along = ((xx - mx) * ux + (yy - my) * uy) / norm
            line = (np.abs(along) <= 1.2) & (neck | head) & (np.hypot(xx - mx, yy - my) <= 8)
            img[line] -= 1000.0
        elif cls == "hardware":
            ux, uy = (nx - hx), (ny - hy)
            norm = np.hypot(ux, uy)
            t2 = ((xx - hx) * ux + (yy - hy) * uy) / norm
            perp = np.abs((xx - hx) * uy - (yy - hy) * ux) / norm
            screw = (perp <= 1.6) & (t2 >= -hr * 0.6) & (t2 <= norm + 22)
            img[screw] = 3900.0
        x0, x1 = min(hx - hr, nx - 5.5) - 2, max(hx + hr, nx + 5.5) + 2
        y0, y1 = hy - hr - 2, ny + 8
        truths.append(HipTruth(side, cls, (x0 * s, y0 * s, x1 * s, y1 * s)))
    img += rng.normal(0.0, 40.0, img.shape).astype(np.float32)
    img = np.clip(img, 0, 4095).astype(np.uint16)
    return img, (truths[0], truths[1])


# --------------------------------------------------------------------------- DICOM


@dataclass
class PhantomStudy:
    """A synthetic study: its DICOM datasets and the truth they were made from."""

    study_uid: str
    patient: FakePatient
    study_date: str
    datasets: list[Dataset]
    labels: np.ndarray | None = None  # (z, y, x) ground truth of 3D phantoms
    spacing: tuple[float, float, float] | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    hips: list[tuple[HipTruth, HipTruth]] = field(default_factory=list)

    def truth_volumes_ml(self) -> dict[str, float]:
        """Ground-truth volume of each label: voxel count x voxel volume."""
        if self.labels is None or self.spacing is None:
            return {}
        voxel_ml = float(np.prod(self.spacing)) / 1000.0
        return {
            name: float((self.labels == value).sum()) * voxel_ml
            for value, name in self.label_names.items()
        }

    def write(self, directory: Path) -> list[Path]:
        """Write every instance as ``<SOPInstanceUID>.dcm`` (Part 10 files)."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in self.datasets:
            path = directory / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


def _base(
    rng: np.random.Generator,
    patient: FakePatient,
    study_uid: str,
    study_date: str,
    sop_class: str,
    modality: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(rng)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "LASTMILE-PHANTOM"
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age_on(study_date)
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACC{int(rng.integers(10**6, 10**7))}"
    ds.ReferringPhysicianName = "Referrer^Fake"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.Manufacturer = "Lastmile Phantoms"
    ds.ManufacturerModelName = "synthetic"
    ds.InstitutionName = "Phantom General Hospital"
    ds.StationName = "PHANTOM01"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    return ds


def _series_3d(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    rng: np.random.Generator,
    patient: FakePatient,
    study_uid: str,
    study_date: str,
    sop_class: str,
    modality: str,
    description: str,
    series_number: int,
    body_part: str,
    ct: bool,
) -> list[Dataset]:
    """Axial slices of ``volume`` as single-frame instances of one series."""
    series_uid, frame_uid = _uid(rng), _uid(rng)
    nz, ny, nx = volume.shape
    dz, dy, dx = spacing
    x0, y0 = -(nx - 1) / 2.0 * dx, -(ny - 1) / 2.0 * dy
    out = []
    for k in range(nz):
        ds = _base(rng, patient, study_uid, study_date, sop_class, modality)
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.BodyPartExamined = body_part
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(k * dz - 60.0, 4)]
        ds.SliceLocation = round(k * dz - 60.0, 4)
        ds.SliceThickness = dz
        ds.SpacingBetweenSlices = dz
        ds.PixelSpacing = [dy, dx]
        ds.Rows, ds.Columns = ny, nx
        ds.PatientPosition = "HFS"
        if ct:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.KVP = 120
            ds.WindowCenter, ds.WindowWidth = 60, 400
            stored = (volume[k].astype(np.int32) + 1024).astype(np.int16)
        else:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 9000, 120, 1
            ds.MagneticFieldStrength = 3
            stored = volume[k].astype(np.uint16)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        out.append(ds)
    return out


def brain_mr_study(
    seed: int,
    *,
    patient: FakePatient | None = None,
    study_date: str = "20260301",
    lesion_radius_mm: float | None = None,
    lesion_centre_mm: tuple[float, float, float] | None = None,
    extra_localizer: bool = True,
) -> PhantomStudy:
    """A post-surgical brain MR: an axial FLAIR series with a lesion (and a 3-slice
    localizer that series selection must reject)."""
    rng = np.random.default_rng(seed)
    patient = patient or fake_patient(seed)
    study_uid = _uid(rng)
    spacing = (3.0, 1.5, 1.5)
    img, lesion = brain_mr_arrays(rng, spacing=spacing, lesion_radius_mm=lesion_radius_mm,
                                  lesion_centre_mm=lesion_centre_mm)
    common = dict(rng=rng, patient=patient, study_uid=study_uid, study_date=study_date,
                  sop_class=MR_IMAGE_STORAGE, modality="MR", body_part="BRAIN", ct=False)
    datasets = _series_3d(img, spacing, description="AX T2 FLAIR", series_number=3,
                          **common)  # type: ignore[arg-type]
    if extra_localizer:
        datasets += _series_3d(img[::14][:3], (40.0, 1.5, 1.5), description="LOCALIZER",
                               series_number=1, **common)  # type: ignore[arg-type]
    return PhantomStudy(study_uid, patient, study_date, datasets, lesion, spacing, BTS_LABELS)


def abdomen_ct_study(
    seed: int, *, patient: FakePatient | None = None, study_date: str = "20260302"
) -> PhantomStudy:
    """A portal-venous abdomen CT with left/right liver lobes and vessels."""
    rng = np.random.default_rng(seed)
    patient = patient or fake_patient(seed)
    study_uid = _uid(rng)
    spacing = (5.0, 4.0, 4.0)
    hu, labels = abdomen_ct_arrays(rng, spacing=spacing)
    datasets = _series_3d(hu, spacing, rng=rng, patient=patient, study_uid=study_uid,
                          study_date=study_date, sop_class=CT_IMAGE_STORAGE, modality="CT",
                          description="ABD PORTAL VENOUS 5mm", series_number=2,
                          body_part="ABDOMEN", ct=True)
    return PhantomStudy(study_uid, patient, study_date, datasets, labels, spacing, LTS_LABELS)


def pelvis_study(
    seed: int,
    *,
    patient: FakePatient | None = None,
    study_date: str = "20260303",
    images: int = 5,
    size: int = 1024,
    modality: str = "CR",
    classes: tuple[str, str] | None = None,
) -> PhantomStudy:
    """A pelvis radiograph exam: ``images`` CR (or DX) images, one series each view."""
    rng = np.random.default_rng(seed)
    patient = patient or fake_patient(seed)
    study_uid = _uid(rng)
    series_uid = _uid(rng)
    datasets, hips = [], []
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE
    for i in range(images):
        img, truth = pelvis_radiograph(rng, size, classes)
        classes = classes or (truth[0].classification, truth[1].classification)
        ds = _base(rng, patient, study_uid, study_date, sop_class, modality)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = "PELVIS AP"
        ds.BodyPartExamined = "PELVIS"
        ds.ViewPosition = "AP"
        ds.PatientOrientation = ["R", "F"]
        ds.InstanceNumber = i + 1
        ds.ImagerPixelSpacing = [0.35 * 1024 / size] * 2
        ds.Rows = ds.Columns = size
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        if modality == "DX":
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.PixelIntensityRelationship = "LOG"
            ds.PixelIntensityRelationshipSign = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
            ds.BurnedInAnnotation = "NO"
            ds.DetectorType = "DIRECT"
            ds.Laterality = ""
        ds.PixelData = img.tobytes()
        datasets.append(ds)
        hips.append(truth)
    return PhantomStudy(study_uid, patient, study_date, datasets, hips=hips)


def uid_for(*parts: object) -> str:
    """A UID derived from ``parts`` (for callers that need a stable synthetic UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])
