"""Results as DICOM objects (highdicom): SEG for masks, Comprehensive 3D SR (TID 1500)
for measurements and classifications.

Objects are only built here, in memory; writing files and sending them are the
worker's and ``engine.pacs``'s business. Every object carries the model's
AlgorithmIdentification (name, version, SHA-256 as a parameter), so provenance
travels inside it (PS3.3 C.8.20.2 and TID 4019). UIDs are derived from the run key,
so a re-run of the same key rebuilds the *same* instances (a PACS that receives one
twice keeps one).

Codes: every label, class and finding name is coded by the pipeline file's ``codes:``
(value, scheme, meaning; SNOMED CT or DCM from pydicom's dictionaries for the
reference pipelines); a name the file does not code gets a private ``99LM`` code
whose meaning is the name. Our own concepts without a standard code (% change from
baseline and prior, progression) use ``99LM`` too; every private scheme an object uses
is declared in its CodingSchemeIdentificationSequence (PS3.3 C.12.1.1.2).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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
#: the concept name of a classification's qualitative evaluation (TID 1501)
FINDING = codes.DCM.Finding  # (121071, DCM, "Finding")
PROBABILITY = codes.DCM.Probability  # (122157, DCM, "Probability")
PRESENT = codes.SCT.Present  # (52101004, SCT, "Present")
ABSENT = codes.SCT.Absent  # (272519000, SCT, "Absent")
#: an uncoded segment's category: the generic one of CID 7150
UNCODED_CATEGORY = codes.SCT.Tissue


class CodeLike(Protocol):
    """A coded name as the pipeline file gives it (``engine.pipeline_model.CodeSpec``)."""

    value: str
    scheme: str
    meaning: str
    scheme_version: str | None

    @property
    def category(self) -> CodeLike | None: ...

    @property
    def site(self) -> CodeLike | None: ...


Codes = Mapping[str, CodeLike]


def _code(c: CodeLike) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(c.value, c.scheme, c.meaning, c.scheme_version)


def concept(name: str, codebook: Codes | None) -> Code | hd.sr.CodedConcept:
    """The coded concept of a label, class or finding ``name``: the file's code, or a
    private ``99LM`` code whose meaning is the name (PS3.16 8: private designators)."""
    found = (codebook or {}).get(name)
    if found is not None:
        return _code(found)
    return Code(f"LM-{name.upper()[:13]}", PRIVATE_SCHEME, name[:64])


def site_of(name: str, codebook: Codes | None) -> hd.sr.CodedConcept | None:
    found = (codebook or {}).get(name)
    return _code(found.site) if found is not None and found.site is not None else None


def segment_codes(name: str, codebook: Codes | None
                  ) -> tuple[Code | hd.sr.CodedConcept, Code | hd.sr.CodedConcept]:
    """(segmented property category, type) of a segment label (PS3.3 C.8.20.4)."""
    found = (codebook or {}).get(name)
    category = _code(found.category) if found is not None and found.category else None
    return category or UNCODED_CATEGORY, concept(name, codebook)


def private_schemes(codebook: Codes | None) -> set[str]:
    """The private coding schemes (designators starting with ``99``) a codebook uses."""
    out = {PRIVATE_SCHEME}
    for c in (codebook or {}).values():
        for part in (c, c.category, c.site):
            if part is not None and part.scheme.startswith("99"):
                out.add(part.scheme)
    return out


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


def _private_scheme(ds: Dataset, codebook: Codes | None = None) -> None:
    """Declare every private scheme the object may use (PS3.3 C.12.1.1.2)."""
    items = []
    for scheme in sorted(private_schemes(codebook)):
        item = Dataset()
        item.CodingSchemeDesignator = scheme
        item.CodingSchemeName = ("Lastmile local codes" if scheme == PRIVATE_SCHEME
                                 else "Local codes of a pipeline file")
        item.CodingSchemeResponsibleOrganization = "Lastmile project"
        items.append(item)
    ds.CodingSchemeIdentificationSequence = items


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
    codebook: Codes | None = None,
) -> Dataset:
    """A BINARY DICOM SEG (PS3.3 A.51) of label map ``labels`` ``(z, y, x)``, one
    segment per named label, coded by ``codebook`` (``segment_codes``; its ``site`` as
    the segment's anatomic region).

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
        category, kind = segment_codes(names[value], codebook)
        site = site_of(names[value], codebook)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names[value][:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=uid_from(prov.run_key, "segment", number),
            tracking_id=f"{prov.pipeline}:{names[value]}",
            anatomic_regions=[site] if site is not None else None,
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
    _private_scheme(seg, codebook)
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
    codebook: Codes | None = None,
) -> Dataset:
    """TID 1500 Measurement Report: per segment of ``seg``, its volume (and % change
    from baseline and prior, and the progression flag, when known); finding type and
    site from ``codebook``."""
    algo = prov.algorithm_id()
    groups = []
    series_uid = str(sources[0].SeriesInstanceUID)
    for m in measurements:
        kind, sites = concept(m.label, codebook), _sites(m.label, codebook)
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
            finding_sites=sites,
            algorithm_id=algo,
            measurements=items,
            qualitative_evaluations=qualitative or None,
        ))
    report = MeasurementReport(
        observation_context=_observation_context(prov),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    return _sr(report, [*sources, seg], prov, series_number, codebook)


def _sites(name: str, codebook: Codes | None) -> list[hd.sr.FindingSite] | None:
    site = site_of(name, codebook)
    return [hd.sr.FindingSite(site)] if site is not None else None


def build_volume_sr_on_images(
    sources: Sequence[Dataset],
    measurements: Sequence[SegmentMeasurement],
    prov: Provenance,
    *,
    series_number: int = 901,
    codebook: Codes | None = None,
) -> Dataset:
    """TID 1500 Measurement Report without a SEG: per label, a measurement group
    (TID 1501) with its volume (and changes) and references to the source images it
    was measured on, for when no SEG can be written over ``sources``."""
    algo = prov.algorithm_id()
    refs = [SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
    groups: list[MeasurementsAndQualitativeEvaluations] = []
    for m in measurements:
        items, qualitative = _volume_items(m, algo)
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uid_from(prov.run_key, "tracking", m.segment_number),
                identifier=f"{prov.pipeline}:{m.label}"),
            finding_type=concept(m.label, codebook),
            finding_sites=_sites(m.label, codebook),
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
    return _sr(report, list(sources), prov, series_number, codebook)


@dataclass(frozen=True)
class HipFinding:
    source: Dataset
    side: str
    classification: str
    probability: float
    box: tuple[float, float, float, float]


def build_findings_sr(findings: Sequence[HipFinding], prov: Provenance, *,
                      series_number: int = 902, finding: str | None = None,
                      codebook: Codes | None = None) -> Dataset:
    """TID 1500 report of detections: per image and region, the box (a closed polyline
    on the image, TID 1410), its classification (a qualitative evaluation: Finding ->
    the class's code) and the probability (DCM Probability). ``finding``: the name of
    what each region is (its code the finding type; DCM Finding when not given)."""
    finding_type = concept(finding, codebook) if finding else FINDING
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
            finding_type=finding_type,
            finding_sites=_sites(finding, codebook) if finding else None,
            algorithm_id=algo,
            measurements=[Measurement(name=PROBABILITY, value=round(f.probability, 4),
                                      unit=NO_UNITS, algorithm_id=algo)],
            qualitative_evaluations=[QualitativeEvaluation(
                FINDING, concept(f.classification, codebook))],
        ))
    report = MeasurementReport(
        observation_context=_observation_context(prov),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    unique = {str(f.source.SOPInstanceUID): f.source for f in findings}
    return _sr(report, list(unique.values()), prov, series_number, codebook)


@dataclass(frozen=True)
class ClassProbability:
    """One class's (or one multi-label class's) probability for the SR: for the study,
    and per image of a 2D model (``per_image``: (source image, probability))."""

    name: str
    probability: float
    per_image: tuple[tuple[Dataset, float], ...] = ()


@dataclass(frozen=True)
class ClassificationResult:
    """A classification for the SR: of ``finding``, the ``decision`` (a class name, or
    ``present``/``absent`` for one class of a multi-label model) and the probabilities
    of its classes."""

    finding: str
    decision: str
    classes: tuple[ClassProbability, ...]


def build_classification_sr(results: Sequence[ClassificationResult],
                            sources: Sequence[Dataset], prov: Provenance, *,
                            aggregate: Code | None = None, series_number: int = 903,
                            codebook: Codes | None = None) -> Dataset:
    """TID 1500 report of classifications over ``sources`` (the images or the series
    classified), every group (TID 1501) referencing them, coded by ``codebook``:

    - a decision: a group whose finding type is the finding's code, with a qualitative
      evaluation DCM Finding = the decided class's code; then per class a group whose
      finding type is the class's code, with its DCM Probability;
    - one class of a multi-label model (decision ``present``/``absent``): one group,
      finding type the class's code, Finding = SNOMED CT Present/Absent, and P(present).

    Probabilities: the study's (derived by ``aggregate``, e.g. SCT Mean, when made from
    a 2D model's images) and each image's, referencing it (TID 320)."""
    algo = prov.algorithm_id()
    refs = [SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
    groups: list[MeasurementsAndQualitativeEvaluations] = []

    def group(name: str, *, decision: Code | hd.sr.CodedConcept | None,
              probability: ClassProbability | None) -> None:
        items = []
        if probability is not None:
            items.append(_probability(probability.probability, algo,
                                      aggregate if probability.per_image else None))
            items += [_probability(p, algo, None, src) for src, p in probability.per_image]
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uid_from(prov.run_key, "classification", len(groups)),
                identifier=f"{prov.pipeline}:{name}"[:64]),
            finding_type=concept(name, codebook),
            finding_sites=_sites(name, codebook),
            algorithm_id=algo,
            measurements=items or None,
            qualitative_evaluations=[QualitativeEvaluation(FINDING, decision)]
            if decision is not None else None,
            source_images=refs,
        ))

    for result in results:
        if result.decision in ("present", "absent"):
            present = next((c for c in result.classes if c.name == "present"), None)
            group(result.finding, probability=present,
                  decision=PRESENT if result.decision == "present" else ABSENT)
            continue
        group(result.finding, decision=concept(result.decision, codebook), probability=None)
        for c in result.classes:
            group(c.name, decision=None, probability=c)
    report = MeasurementReport(
        observation_context=_observation_context(prov),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    return _sr(report, list(sources), prov, series_number, codebook)


def _probability(value: float, algo: AlgorithmIdentification,
                 derivation: Code | None, source: Dataset | None = None) -> Measurement:
    """A DCM Probability (unit 1), derived (e.g. Mean) or measured on one image."""
    return Measurement(
        name=PROBABILITY, value=round(float(value), 6), unit=NO_UNITS, algorithm_id=algo,
        derivation=derivation,
        referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(source)]
        if source is not None else None)


def _sr(report: MeasurementReport, evidence: Sequence[Dataset], prov: Provenance,
        series_number: int, codebook: Codes | None = None) -> Dataset:
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
    _private_scheme(sr, codebook)
    return sr
