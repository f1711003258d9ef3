"""The typed model of a pipeline file (``PipelineSpec``) and of a validated, loaded one
(``LoadedPipeline``): what the operators read at run time. Parsing and validation against
the operator registry live in ``engine.spec``, which imports the registry; this module
imports neither, so the steps can name these types without an import circle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from engine.ops.selection import PHOTOMETRIC_TERMS, TIE_BREAKS, InputContract, SelectionRule
from engine.runtimes import RUNTIME_NAMES

SPEC_VERSION = 1
Stage = Literal["staging", "silent", "validation", "clinical"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectionSpec(_Strict):
    modalities: tuple[str, ...] = ()
    description_regex: str | None = None
    exclude_regex: str | None = None
    orientation: Literal["axial", "coronal", "sagittal"] | None = None
    min_slices: int = Field(1, ge=1)
    max_slices: int | None = Field(None, ge=1)
    max_spacing_mm: float | None = Field(None, gt=0)
    multiple: bool = False
    #: a condition of the rule language (``dicom_rules``) on the series' first instance
    when: dict[str, Any] | None = None
    #: how a tie among matching series is broken: names of ``TIE_BREAKS``, in order
    tie_break: tuple[str, ...] = ()

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

    modalities: tuple[str, ...] = ()
    photometric: tuple[str, ...] = ()
    bits_stored: tuple[int, int] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    body_parts: tuple[str, ...] = ()
    body_part_required: bool = False

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
    op: str
    params: dict[str, Any] = Field(default_factory=dict)


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

    name: str | None = None  # which named output (default: the first)
    values: Literal["logits", "probabilities"] = "logits"
    activation: Literal["softmax", "sigmoid"] = "softmax"
    channels: int | None = Field(None, ge=1)
    thresholds: dict[str, float] = Field(default_factory=dict)
    otherwise: str | None = None

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

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)
    scheme_version: str | None = None
    category: CodeSpec | None = None
    site: CodeSpec | None = None

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
    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    path: Path
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    card: Path | None = None
    labels: dict[int, str] = Field(default_factory=dict)  # segmentation label values
    #: classification: class names in output channel order
    classes: tuple[str, ...] = ()
    output: OutputDecl = Field(default_factory=lambda: OutputDecl.model_validate({}))

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
    kind: Literal["store", "pacs"]
    ae_title: str | None = Field(None, max_length=16)
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    retries: int = Field(3, ge=0, le=20)
    retry_delay_s: float = Field(1.0, ge=0)
    # the stages in which this destination receives results: PACS only once readers
    # may see them (silent trials keep results from clinicians)
    stages: tuple[Stage, ...] = ("staging", "silent", "validation", "clinical")

    @model_validator(mode="after")
    def _pacs_address(self) -> PublisherSpec:
        if self.kind == "pacs" and not (self.ae_title and self.host and self.port):
            raise ValueError("a pacs publisher needs ae_title, host and port")
        return self


class OutputSpec(_Strict):
    seg: bool = False
    sr: bool = True
    series_description: str = Field("Lastmile AI result", max_length=64)
    blinding_hash: bool = False  # LTS: salted hash in the SEG series description


class TargetsSpec(_Strict):
    """``targets:``: what the governance board holds this pipeline to. ``runtime_s``: the
    runtime (seconds, study completed -> result) that the share of runs is measured
    against, shown by ``lastmile metrics``, the pages and the governance report; it
    travels in ``PipelineDeployed.runtime_target_s`` so every reader gets it from here."""

    runtime_s: float | None = Field(None, gt=0)


class PipelineSpec(_Strict):
    spec_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    version: str = Field(min_length=1, max_length=32)
    description: str = ""
    task: Literal["segmentation3d", "detection2d", "classification2d", "classification3d"]
    ae_title: str = Field(max_length=16, pattern=r"^[A-Z0-9_ ]+$")
    selection: SelectionSpec
    input: InputSpec = Field(default_factory=lambda: InputSpec.model_validate({}))
    operators: tuple[OperatorSpec, ...] = Field(min_length=1)
    model: ModelSpec
    #: cascades: further models by name, run by an inferer's ``model:`` (engine README)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    runtime: str = "auto"
    fp16: bool = False
    outputs: OutputSpec = Field(default_factory=lambda: OutputSpec.model_validate({}))
    #: what each label, class and finding name means (``engine.codes``)
    codes: dict[str, CodeSpec] = Field(default_factory=dict)
    targets: TargetsSpec = Field(default_factory=lambda: TargetsSpec.model_validate({}))
    publishers: tuple[PublisherSpec, ...] = Field(
        default_factory=lambda: (PublisherSpec.model_validate({"kind": "store"}),))

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        if v not in RUNTIME_NAMES:
            raise ValueError(f"unknown runtime {v!r}; one of {', '.join(RUNTIME_NAMES)}")
        return v


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


