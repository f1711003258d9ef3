"""The typed model of a pipeline file (``PipelineSpec``) and of a validated, loaded one
(``LoadedPipeline``): what the operators read at run time. Parsing and validation against
the operator registry live in ``engine.spec``, which imports the registry; this module
imports neither, so the steps can name these types without an import circle.

Schema versions: ``PipelineSpec`` is version 2 (``SPEC_VERSION``), the one schema that
covers the input contract, selection on any attribute, declared model output, codes,
MONAI operators, runtimes and cascades. A file of an earlier version is read through
its upcast (``UPCASTS``: ``upcast_v1``), a pure function of the file's mapping, so every
file ever deployed (its text is in the event log) still loads; ``engine.spec`` chooses
by the file's ``spec_version`` and names the file, line and key of an unknown one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from engine.ops.selection import (
    DEFAULT_TIE_BREAK,
    PHOTOMETRIC_TERMS,
    TIE_BREAKS,
    InputContract,
    SelectionRule,
)
from engine.runtimes import RUNTIME_NAMES

#: the schema this Lastmile writes and validates; earlier ones are upcast to it
SPEC_VERSION = 2
Stage = Literal["staging", "silent", "validation", "clinical"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectionSpec(_Strict):
    """``selection:``: which series of a study the pipeline runs on; every series is
    chosen or rejected with a reason (``engine.ops.selection.select_series``)."""

    modalities: tuple[str, ...] = Field((), description=(
        "Modality (0008,0060) one of these; empty: any"))
    description_regex: str | None = Field(None, description=(
        "SeriesDescription (0008,103E) must match (case-insensitive)"))
    exclude_regex: str | None = Field(None, description=(
        "SeriesDescription (0008,103E) must not match (case-insensitive)"))
    orientation: Literal["axial", "coronal", "sagittal"] | None = Field(None, description=(
        "from ImageOrientationPatient (> ~25 degrees off: oblique); empty: any"))
    min_slices: int = Field(1, ge=1, description=(
        "fewest slices (instances, or frames of a multi-frame)"))
    max_slices: int | None = Field(None, ge=1, description="most slices; empty: no limit")
    max_spacing_mm: float | None = Field(None, gt=0, description=(
        "largest PixelSpacing or SliceThickness allowed"), json_schema_extra={"unit": "mm"})
    multiple: bool = Field(False, description=(
        "true: every matching series (radiographs); false: one, by tie_break"))
    when: dict[str, Any] | None = Field(None, description=(
        "a condition of the routing rule language (equals, one_of, regex, range, exists; "
        "all, any, not) on any attribute of the series' first instance"))
    tie_break: tuple[str, ...] = Field(DEFAULT_TIE_BREAK, min_length=1, description=(
        "when several series match and one is taken, the first of these that differs "
        "decides: " + ", ".join(TIE_BREAKS)))

    @field_validator("when")
    @classmethod
    def _when(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _condition(v)
        return v

    @field_validator("tie_break")
    @classmethod
    def _tie_break(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in v if n not in TIE_BREAKS]
        if unknown:
            raise ValueError(f"unknown tie-break {', '.join(unknown)} (known: "
                             f"{', '.join(TIE_BREAKS)})")
        return v

    @field_validator("description_regex", "exclude_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        import re

        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    def rule(self) -> SelectionRule:
        fields = self.model_dump(exclude={"when"})
        return SelectionRule(**fields, when=_condition(self.when) if self.when else None)


def _condition(data: dict[str, Any]) -> Any:
    """``selection.when`` parsed by the rule language, or ``ValueError`` saying why."""
    from dicom_rules.errors import RuleError
    from dicom_rules.parse import parse_condition

    try:
        return parse_condition(data, "selection.when", "when")
    except RuleError as exc:
        raise ValueError(str(exc).removeprefix("selection.when: ")) from None


class InputSpec(_Strict):
    """``input:``: what the model was validated on; series outside it are refused with
    the reason (``engine.ops.selection.contract_violation``)."""

    modalities: tuple[str, ...] = Field((), description=(
        "Modality (0008,0060) values the model was validated on; empty: any"))
    photometric: tuple[str, ...] = Field((), description=(
        "PhotometricInterpretation (0028,0004) terms it takes (PS3.3 C.7.6.3.1.2)"))
    bits_stored: tuple[int, int] | None = Field(None, description=(
        "BitsStored (0028,0101) range [low, high], inclusive"),
        json_schema_extra={"unit": "bits"})
    pixel_spacing_mm: tuple[float, float] | None = Field(None, description=(
        "PixelSpacing (else ImagerPixelSpacing) range [low, high]"),
        json_schema_extra={"unit": "mm"})
    body_parts: tuple[str, ...] = Field((), description=(
        "BodyPartExamined (0018,0015) values it takes; empty: any"))
    body_part_required: bool = Field(False, description=(
        "true: a series without BodyPartExamined is refused"))

    @field_validator("photometric")
    @classmethod
    def _photometric(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in v if p not in PHOTOMETRIC_TERMS]
        if unknown:
            raise ValueError(f"not a photometric interpretation of PS3.3 C.7.6.3.1.2: "
                             f"{', '.join(unknown)}")
        return v

    @field_validator("bits_stored", "pixel_spacing_mm")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError("a range [low, high] with 0 < low <= high")
        return v

    def contract(self) -> InputContract:
        return InputContract(**self.model_dump())


class OperatorSpec(_Strict):
    """One step of ``operators:``."""

    op: str = Field(description="the operator's name (Operators, below)")
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "the operator's parameters (its table below)"))


class OutputDecl(_Strict):
    """``model.output``: what the model's output *is*, declared, never guessed.

    ``values``: ``logits`` (the engine applies ``activation``) or ``probabilities``
    (used as they are, checked to lie in [0, 1]). ``activation``: ``softmax`` (classes
    exclude each other: segmentation channel 0 is background, channel k label k) or
    ``sigmoid`` (each channel on its own: segmentation channel k-1 is label k, one
    channel is label 1; classification: one channel is P(second class), several are
    independent labels). ``channels``: the number of output channels, checked against
    the model at run time. ``thresholds``: per label or class name, the probability at
    or above which it is decided (default: the most probable class for softmax, 0.5 for
    sigmoid). ``otherwise``: the class decided when no class reaches its threshold."""

    name: str | None = Field(None, description="which named output; empty: the first")
    values: Literal["logits", "probabilities"] = Field(description=(
        "logits go through activation; probabilities are used as they are (checked to "
        "lie in [0, 1], never a second softmax)"))
    activation: Literal["softmax", "sigmoid"] = Field(description=(
        "softmax: classes exclude each other (channel 0 background); sigmoid: each "
        "channel on its own"))
    channels: int | None = Field(None, ge=1, description=(
        "output channels, checked at load and against the model at run time; empty: "
        "unchecked"))
    thresholds: dict[str, float] = Field(default_factory=dict, description=(
        "per label or class name, the probability (0 < p < 1) at or above which it is "
        "decided"))
    otherwise: str | None = Field(None, description=(
        "softmax classification: the class decided when none reaches its threshold"))

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, t in v.items() if not 0.0 < t < 1.0]
        if bad:
            raise ValueError(f"thresholds lie strictly between 0 and 1 ({', '.join(bad)})")
        return v

    @model_validator(mode="after")
    def _channels(self) -> OutputDecl:
        if self.activation == "softmax" and self.channels == 1:
            raise ValueError("one output channel needs activation: sigmoid (a softmax over "
                             "one channel is always 1)")
        return self


SCHEMES = ("SCT", "DCM", "LN", "UCUM", "FMA", "RADLEX", "NCIt", "UMLS", "SRT")


class CodeSpec(_Strict):
    """A coded concept (PS3.3 8.8; highdicom ``CodedConcept``): ``value``, ``scheme``
    (a PS3.16 coding scheme designator: SCT, DCM, LN, ...; a private one starts with
    ``99``), ``meaning``. For a segment: ``category`` (its segmented property category,
    CID 7150) and ``site`` (its anatomic location, CID 4)."""

    value: str = Field(min_length=1, max_length=64, description="Code Value")
    scheme: str = Field(min_length=1, max_length=16, description=(
        "Coding Scheme Designator: " + ", ".join(SCHEMES) + ", or private (99...)"))
    meaning: str = Field(min_length=1, max_length=64, description="Code Meaning")
    scheme_version: str | None = Field(None, description="Coding Scheme Version")
    category: CodeSpec | None = Field(None, description=(
        "a segment's Segmented Property Category (CID 7150), a code like this one"))
    site: CodeSpec | None = Field(None, description=(
        "its anatomic location (CID 4): the SEG's Anatomic Region, the SR's Finding Site"))

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v not in SCHEMES and not v.startswith("99"):
            raise ValueError(f"coding scheme {v!r} is neither a standard one "
                             f"({', '.join(SCHEMES)}) nor private (starting with 99, "
                             "PS3.16 8)")
        return v

    @property
    def private(self) -> bool:
        return self.scheme.startswith("99")


class ModelSpec(_Strict):
    """``model:`` (and each of ``models:``): the model file, checked by its hash, and
    what its output is. Version 2 requires ``output`` (``values``, ``activation``)."""

    name: str = Field(min_length=1, max_length=64, description="the model's name")
    version: str = Field(min_length=1, max_length=64, description="the model's version")
    path: Path = Field(description=(
        "ONNX or PyTorch program: relative to the pipeline file, absolute, or "
        "package:NAME/inner/path inside an installed Python package"))
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description=(
        "SHA-256 of the model file (hex); a different file is refused"))
    card: Path | None = Field(None, description="model card (Markdown), path as for path")
    labels: dict[int, str] = Field(default_factory=dict, description=(
        "segmentation: label value (1, 2, ...) -> name"))
    classes: tuple[str, ...] = Field((), description=(
        "classification: class names in output channel order"))
    output: OutputDecl = Field(description="what the model outputs (Model output, above)")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[int, str]) -> dict[int, str]:
        if any(k <= 0 for k in v):
            raise ValueError("label values start at 1 (0 is background)")
        return v

    @model_validator(mode="after")
    def _names(self) -> ModelSpec:
        names = set(self.labels.values()) | set(self.classes)
        unknown = [k for k in (*self.output.thresholds, *filter(None, [self.output.otherwise]))
                   if k not in names]
        if unknown:
            raise ValueError(f"output names {', '.join(unknown)}, which are neither labels "
                             "nor classes of this model")
        return self


class PublisherSpec(_Strict):
    """One of ``publishers:``: where results go."""

    kind: Literal["store", "pacs"] = Field(description=(
        "store: the results folder; pacs: C-STORE to a PACS"))
    ae_title: str | None = Field(None, max_length=16, description="pacs: its AE title")
    host: str | None = Field(None, description="pacs: its host")
    port: int | None = Field(None, ge=1, le=65535, description="pacs: its port")
    retries: int = Field(3, ge=0, le=20, description=(
        "quick retries of an unreachable PACS (then the redelivery consumer)"))
    retry_delay_s: float = Field(1.0, ge=0, description="between quick retries",
                                 json_schema_extra={"unit": "s"})
    stages: tuple[Stage, ...] = Field(("staging", "silent", "validation", "clinical"),
                                      description=(
        "the stages in which it receives results (a PACS only once readers may see them)"))

    @model_validator(mode="after")
    def _pacs_address(self) -> PublisherSpec:
        if self.kind == "pacs" and not (self.ae_title and self.host and self.port):
            raise ValueError("a pacs publisher needs ae_title, host and port")
        return self


class OutputSpec(_Strict):
    """``results:`` (``outputs:`` in version 1): which DICOM results a run writes."""

    seg: bool = Field(False, description="write a DICOM SEG")
    sr: bool = Field(True, description="write a TID 1500 SR")
    series_description: str = Field("Lastmile AI result", max_length=64, description=(
        "SeriesDescription of the SEG and of a classification's SR (other SRs: "
        "AI <name> measurements)"))
    blinding_hash: bool = Field(False, description=(
        "blinded reading (LTS): a salted hash in the SEG's series description"))


class TargetsSpec(_Strict):
    """``targets:``: what the governance board holds this pipeline to. ``runtime_s``: the
    runtime (seconds, study completed -> result) that the share of runs is measured
    against, shown by ``lastmile metrics``, the pages and the governance report; it
    travels in ``PipelineDeployed.runtime_target_s`` so every reader gets it from here."""

    runtime_s: float | None = Field(None, gt=0, description=(
        "runtime target, study completed -> result"), json_schema_extra={"unit": "s"})


class PipelineSpec(_Strict):
    """A pipeline file, schema version 2 (``SPEC_VERSION``). Version 1 files reach it
    through ``upcast_v1``. ``outputs`` is the file's ``results:`` key."""

    spec_version: Literal[2] = Field(description=(
        "the schema version: 2 (a file without it is version 1, read through its upcast)"))
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description=(
        "the pipeline's name: lower case, digits, - and _, up to 32"))
    version: str = Field(min_length=1, max_length=32, description="the pipeline's version")
    description: str = Field("", description="one line for people")
    task: Literal["segmentation3d", "detection2d", "classification2d",
                  "classification3d"] = Field(description="the task type")
    ae_title: str = Field(max_length=16, pattern=r"^[A-Z0-9_ ]+$", description=(
        "the called AE title a modality sends to for this pipeline (accepted from its "
        "deployment on)"))
    selection: SelectionSpec = Field(description="which series it runs on")
    input: InputSpec = Field(default_factory=lambda: InputSpec.model_validate({}),
                             description="the input contract: what the model was "
                             "validated on")
    operators: tuple[OperatorSpec, ...] = Field(min_length=1, description=(
        "the steps, in order"))
    model: ModelSpec = Field(description="the pipeline's model")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description=(
        "cascades: further models by name, run by an inferer's model: parameter"))
    runtime: str = Field("auto", description=(
        "where models run: " + ", ".join(RUNTIME_NAMES)))
    fp16: bool = Field(False, description="half precision where the runtime offers it")
    outputs: OutputSpec = Field(default_factory=lambda: OutputSpec.model_validate({}),
                                alias="results", description=(
        "the DICOM results a run writes (outputs: in version 1)"))
    codes: dict[str, CodeSpec] = Field(default_factory=dict, description=(
        "what each label, class and finding name means: name -> code"))
    targets: TargetsSpec = Field(default_factory=lambda: TargetsSpec.model_validate({}),
                                 description="what the governance board holds it to")
    publishers: tuple[PublisherSpec, ...] = Field(
        default_factory=lambda: (PublisherSpec.model_validate({"kind": "store"}),),
        description="where results go (default: the results folder)")

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        if v not in RUNTIME_NAMES:
            raise ValueError(f"unknown runtime {v!r}; one of {', '.join(RUNTIME_NAMES)}")
        return v


#: version 1's implicit model output (what it assumed when a file declared none)
V1_OUTPUT = {"values": "logits", "activation": "softmax"}
#: keys version 2 renamed: version 2's name -> version 1's (for line numbers of errors)
RENAMED_V1 = {"results": "outputs"}


def upcast_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version 1 pipeline file's mapping as version 2 says the same thing. Pure: the
    input is not changed; a mapping that is malformed where a key moves is left as it
    is there, for validation to report.

    - ``spec_version`` 1 (or absent) -> 2;
    - ``outputs`` -> ``results`` (``outputs`` read too much like ``model.output``);
    - ``model.output`` and each of ``models:``'s: the ``values`` and ``activation``
      version 1 assumed when absent (``logits``, ``softmax``) written out, since
      version 2 requires them (declared, never guessed);
    - ``selection.tie_break`` absent or empty -> the default order it stood for
      (``DEFAULT_TIE_BREAK``).
    """
    out: dict[str, Any] = {k: v for k, v in data.items() if k != "spec_version"}
    out = {"spec_version": 2, **out}
    for new, old in RENAMED_V1.items():
        if old in out and new not in out:
            out = {(new if k == old else k): v for k, v in out.items()}

    def with_output(model: Any) -> Any:
        if not isinstance(model, Mapping):
            return model
        declared = model.get("output")
        if declared is None:
            declared = {}
        if not isinstance(declared, Mapping):
            return dict(model)
        return {**model, "output": {**V1_OUTPUT, **declared}}

    if "model" in out:
        out["model"] = with_output(out["model"])
    if isinstance(out.get("models"), Mapping):
        out["models"] = {k: with_output(m) for k, m in out["models"].items()}
    selection = out.get("selection")
    if isinstance(selection, Mapping) and not selection.get("tie_break"):
        out["selection"] = {**selection, "tie_break": list(DEFAULT_TIE_BREAK)}
    return out


#: earlier schema version -> its upcast to the next; ``upcast`` chains them
UPCASTS: dict[int, Callable[[Mapping[str, Any]], dict[str, Any]]] = {1: upcast_v1}


def upcast(data: Mapping[str, Any], version: int) -> dict[str, Any]:
    """``data`` of schema ``version`` (one of ``UPCASTS`` or ``SPEC_VERSION``) as the
    current schema says it. Pure; raises ``KeyError`` for any other version."""
    out = dict(data)
    while version != SPEC_VERSION:
        out = UPCASTS[version](out)
        version += 1
    return out


class LoadedPipeline(BaseModel):
    """A validated pipeline file, with where it came from and its hash."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    spec: PipelineSpec
    path: Path
    file_sha256: str
    model_path: Path
    card_path: Path | None
    operator_params: tuple[BaseModel, ...]
    #: the file's text as read (deployment events carry it: workers run it from the log)
    text: str = ""
    #: the cascade's further models (``models:``) by name, resolved and hash-checked
    model_paths: dict[str, Path] = {}

    @property
    def name(self) -> str:
        return self.spec.name


