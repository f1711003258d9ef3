"""Results as DICOM objects (highdicom): SEG for masks, Comprehensive 3D SR (TID 1500)
for measurements and classifications.

Objects are only built here, in memory; writing files and sending them are the
worker's and ``engine.pacs``'s business. Every object carries the model's
AlgorithmIdentification (name, version, SHA-256 as a parameter), so provenance
travels inside it (PS3.3 C.8.20.2 and TID 4019). UIDs are derived from the run key,
so a re-run of the same key rebuilds the *same* instances (a PACS that receives one
twice keeps one).

Codes: SNOMED CT where pydicom's dictionary has the concept; the rest (liver lobes,
hip classes, % change) use the private scheme ``99LM`` declared in the
CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

MANUFACTURER = "Lastmile"
SOFTWARE_VERSION = "0.1.0"
PRIVATE_SCHEME = "99LM"

ML = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
NO_UNITS = Code("1", "UCUM", "no units")
PCT_FROM_BASELINE = Code("LM-PCB", PRIVATE_SCHEME, "Percent change from baseline")
PCT_FROM_PRIOR = Code("LM-PCP", PRIVATE_SCHEME, "Percent change from prior")
PROGRESSION = Code("LM-PROG", PRIVATE_SCHEME, "Progression")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
HIP_CLASSIFICATION = Code("LM-HIPC", PRIVATE_SCHEME, "Hip classification")
PROBABILITY = Code("LM-PROB", PRIVATE_SCHEME, "Probability")
CLASS_CODES = {
    "normal": Code("17621005", "SCT", "Normal"),
    "fracture": Code("LM-FX", PRIVATE_SCHEME, "Fracture"),
    "hardware": Code("LM-HW", PRIVATE_SCHEME, "Orthopedic hardware"),
}

# label name -> (segmented property category, type)
SEGMENT_CODES: dict[str, tuple[Code, Code]] = {
    "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
    "left_lobe": (codes.SCT.AnatomicalStructure, Code("LM-LLL", PRIVATE_SCHEME,
                                                        "Left lobe of liver")),
    "right_lobe": (codes.SCT.AnatomicalStructure, Code("LM-RLL", PRIVATE_SCHEME,
                                                         "Right lobe of liver")),
    "vessels": (codes.SCT.AnatomicalStructure, codes.SCT.BloodVessel),
}
DEFAULT_SEGMENT_CODE = (codes.SCT.Tissue, codes.SCT.Tissue)


def uid_from(*parts: object) -> str:
    """A stable UID (2.25 + UUIDv5 of ``parts``): same run key, same instance UIDs."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "\x1f".join(map(str, parts))).int)


@dataclass(frozen=True)
class Provenance:
    """Who made a result: the model and the run (copied into every object)."""

    model_name: str
    model_version: str
    model_sha256: str
    pipeline: str
    pipeline_version: str
    run_key: str

    def algorithm_sequence(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.model_name,
            family=codes.cid7162.ArtificialIntelligence,
            version=self.model_version,
            source=MANUFACTURER,
            parameters={"model_sha256": self.model_sha256,
                        "pipeline": f"{self.pipeline} {self.pipeline_version}"},
        )

    def algorithm_id(self) -> AlgorithmIdentification:
        return AlgorithmIdentification(
            name=self.model_name, version=self.model_version,
            parameters=[f"model_sha256={self.model_sha256}"],
        )


def _private_scheme(ds: Dataset) -> None:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Lastmile local codes"
    item.CodingSchemeResponsibleOrganization = "Lastmile project"
    ds.CodingSchemeIdentificationSequence = [item]


def build_seg(
    sources: Sequence[Dataset],
    labels: np.ndarray,
    names: Mapping[int, str],
    prov: Provenance,
    *,
    series_description: str,
    series_number: int = 900,
    frames: Sequence[int] = (),
    spacing_mm: tuple[float, float, float] | None = None,
    slice_thickness_mm: float | None = None,
) -> Dataset:
    """A BINARY DICOM SEG (PS3.3 A.51) of label map ``labels`` ``(z, y, x)``, one
    segment per named label.

    ``sources``: one single-frame source dataset per slice in the same order, or one
    enhanced multi-frame dataset whose frame ``frames[i]`` (0-based) is slice ``i``.
    ``spacing_mm`` ``(dz, dy, dx)``: the measured grid; when given, the SEG's Pixel
    Measures (PS3.3 C.7.6.16.2.1) are written from it, with ``slice_thickness_mm`` (the
    source's, or the measured spacing where the source has none). Sources should come
    from ``engine.result_sources.result_header`` (valid values to copy).
    Raises ``ValueError`` when the mask does not fit the sources.
    """
    if len(sources) == 1 and frames:
        n_frames = int(sources[0].get("NumberOfFrames", 1) or 1)
        if labels.shape[0] != len(frames) or sorted(frames) != list(range(n_frames)):
            raise ValueError(f"{labels.shape[0]} mask slices for a source of {n_frames} "
                             "frames")
        in_source_order = np.empty_like(labels)
        in_source_order[np.asarray(frames)] = labels
        labels = in_source_order
    elif labels.shape[0] != len(sources):
        raise ValueError(f"{labels.shape[0]} mask slices for {len(sources)} source images")
    values = sorted(names)
    # highdicom wants segment numbers 1..n; remap label values onto them
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.uint8)
    for number, value in enumerate(values, start=1):
        if value < len(lut):
            lut[value] = number
    segmap = lut[labels]
    algo = prov.algorithm_sequence()
    descriptions = []
    for number, value in enumerate(values, start=1):
        category, kind = SEGMENT_CODES.get(names[value], DEFAULT_SEGMENT_CODE)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names[value][:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=uid_from(prov.run_key, "segment", number),
            tracking_id=f"{prov.pipeline}:{names[value]}",
        ))
    measures = None
    if spacing_mm is not None:
        dz, dy, dx = (float(v) for v in spacing_mm)
        measures = hd.PixelMeasuresSequence(
            pixel_spacing=(round(dy, 6), round(dx, 6)),
            slice_thickness=round(float(slice_thickness_mm or dz), 6),
            spacing_between_slices=round(dz, 6),
        )
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=segmap,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid_from(prov.run_key, "seg-series"),
        series_number=series_number,
        sop_instance_uid=uid_from(prov.run_key, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{prov.pipeline} {prov.pipeline_version}"[:64],
        software_versions=SOFTWARE_VERSION,
        device_serial_number=prov.model_sha256[:16],
        series_description=series_description[:64],
        content_label="AI_RESULT",
        content_description=f"{prov.model_name} {prov.model_version}"[:64],
        omit_empty_frames=bool(segmap.any()),
        pixel_measures=measures,
    )
    _private_scheme(seg)
    return seg


def _observation_context(prov: Provenance) -> ObservationContext:
    return ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=uid_from("device", prov.model_sha256),
            name=prov.model_name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=prov.model_version[:64],
        ),
    ))


@dataclass(frozen=True)
class SegmentMeasurement:
    """One segment's measurements for the SR: volume and optional longitudinal change."""

    segment_number: int
    label: str
    volume_ml: float
    change_from_baseline_pct: float | None = None
    change_from_prior_pct: float | None = None
    progression: bool | None = None


def _volume_items(m: SegmentMeasurement, algo: AlgorithmIdentification
                  ) -> tuple[list[Measurement], list[QualitativeEvaluation]]:
    items = [Measurement(name=codes.SCT.Volume, value=round(m.volume_ml, 4), unit=ML,
                         algorithm_id=algo)]
    if m.change_from_baseline_pct is not None:
        items.append(Measurement(name=PCT_FROM_BASELINE, unit=PERCENT, algorithm_id=algo,
                                 value=round(m.change_from_baseline_pct, 3)))
    if m.change_from_prior_pct is not None:
        items.append(Measurement(name=PCT_FROM_PRIOR, unit=PERCENT, algorithm_id=algo,
                                 value=round(m.change_from_prior_pct, 3)))
    qualitative = []
    if m.progression is not None:
        qualitative.append(QualitativeEvaluation(PROGRESSION, YES if m.progression else NO))
    return items, qualitative


def build_volume_sr(
    seg: Dataset,
    sources: Sequence[Dataset],
    measurements: Sequence[SegmentMeasurement],
    prov: Provenance,
    *,
    series_number: int = 901,
) -> Dataset:
    """TID 1500 Measurement Report: per segment of ``seg``, its volume (and % change
    from baseline and prior, and the progression flag, when known)."""
    algo = prov.algorithm_id()
    groups = []
    series_uid = str(sources[0].SeriesInstanceUID)
    for m in measurements:
        _, kind = SEGMENT_CODES.get(m.label, DEFAULT_SEGMENT_CODE)
        items, qualitative = _volume_items(m, algo)
        groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uid_from(prov.run_key, "tracking", m.segment_number),
                identifier=f"{prov.pipeline}:{m.label}"),
            referenced_segment=ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=m.segment_number,
                source_series=SourceSeriesForSegmentation(series_uid)),
            finding_type=kind,
            algorithm_id=algo,
            measurements=items,
            qualitative_evaluations=qualitative or None,
        ))
    report = MeasurementReport(
        observation_context=_observation_context(prov),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    return _sr(report, [*sources, seg], prov, series_number)


def build_volume_sr_on_images(
    sources: Sequence[Dataset],
    measurements: Sequence[SegmentMeasurement],
    prov: Provenance,
    *,
    series_number: int = 901,
) -> Dataset:
    """TID 1500 Measurement Report without a SEG: per label, a measurement group
    (TID 1501) with its volume (and changes) and references to the source images it
    was measured on, for when no SEG can be written over ``sources``."""
    algo = prov.algorithm_id()
    refs = [SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
    groups: list[MeasurementsAndQualitativeEvaluations] = []
    for m in measurements:
        _, kind = SEGMENT_CODES.get(m.label, DEFAULT_SEGMENT_CODE)
        items, qualitative = _volume_items(m, algo)
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uid_from(prov.run_key, "tracking", m.segment_number),
                identifier=f"{prov.pipeline}:{m.label}"),
            finding_type=kind,
            algorithm_id=algo,
            measurements=items,
            qualitative_evaluations=qualitative or None,
            source_images=refs,
        ))
    report = MeasurementReport(
        observation_context=_observation_context(prov),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    return _sr(report, list(sources), prov, series_number)


@dataclass(frozen=True)
class HipFinding:
    source: Dataset
    side: str
    classification: str
    probability: float
    box: tuple[float, float, float, float]


def build_findings_sr(findings: Sequence[HipFinding], prov: Provenance, *,
                      series_number: int = 902) -> Dataset:
    """TID 1500 report of detections: per image and region, the box (a closed polyline
    on the image, TID 1410), its classification and the probability."""
    algo = prov.algorithm_id()
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations
                 | MeasurementsAndQualitativeEvaluations] = []
    for i, f in enumerate(findings):
        x0, y0, x1, y1 = f.box
        polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], np.float32)
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uid_from(prov.run_key, "hip", i), identifier=f"{f.side} hip"),
            referenced_region=ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline,
                source_image=SourceImageForRegion.from_source_image(f.source)),
            finding_type=codes.SCT.HipJoint,
            algorithm_id=algo,
            measurements=[Measurement(name=PROBABILITY, value=round(f.probability, 4),
                                      unit=NO_UNITS, algorithm_id=algo)],
            qualitative_evaluations=[QualitativeEvaluation(
                HIP_CLASSIFICATION, CLASS_CODES.get(f.classification,
                                                    Code(f"LM-{f.classification[:10]}",
                                                         PRIVATE_SCHEME, f.classification)))],
        ))
    report = MeasurementReport(
        observation_context=_observation_context(prov),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    unique = {str(f.source.SOPInstanceUID): f.source for f in findings}
    return _sr(report, list(unique.values()), prov, series_number)


def _sr(report: MeasurementReport, evidence: Sequence[Dataset], prov: Provenance,
        series_number: int) -> Dataset:
    sr = Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=uid_from(prov.run_key, "sr-series"),
        series_number=series_number,
        sop_instance_uid=uid_from(prov.run_key, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI {prov.pipeline} measurements"[:64],
    )
    _private_scheme(sr)
    return sr
