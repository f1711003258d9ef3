"""Pipeline files: typed, versioned YAML, validated with the file, line and key of each error.

Versioned: a file states its schema (``spec_version``, absent = 1); an earlier version
is read through its upcast (``engine.pipeline_model.upcast``) into the current one, and
an unknown version is refused with the file, line and key. The file's hash is of its
bytes as written, so upcasting never changes a deployed file's hash or run key.

A pipeline file names everything a run needs and nothing else: series selection rules,
the ordered operators with their parameters, the model (ONNX path + SHA-256 + model
card), the runtime, outputs and publishers. A new ONNX model of a known task type
(``segmentation3d``, ``detection2d``, ``classification2d``, ``classification3d``) deploys
with a file alone, its output declared (``model.output``) and its names coded
(``codes``).

``load_pipeline(path)`` parses and validates; ``file_sha256`` (of the file's bytes) is
what deployment events carry, so the log says exactly which file ran.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from engine.errors import ModelIntegrityError, SpecError
from engine.pipeline_model import (
    RENAMED_V1,
    SPEC_VERSION,
    UPCASTS,
    LoadedPipeline,
    PipelineSpec,
    upcast,
)
from engine.runtimes import verify_model


def _line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node along ``loc`` in the composed YAML tree."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if str(k.value) == str(key):
                    line = k.start_mark.line + 1
                    nxt = v
                    break
            if nxt is None:
                return line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            if key >= len(node.value):
                return line
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _problems(path: Path, root: yaml.Node | None, errors: list[tuple[tuple[Any, ...], str]]
              ) -> SpecError:
    lines = []
    for loc, msg in errors:
        key = ".".join(str(p) for p in loc) or "(file)"
        line = _line(root, loc)
        lines.append(f"{path}:{line if line else '?'}: {key}: {msg}")
    return SpecError("invalid pipeline file:\n  " + "\n  ".join(lines))


#: the schema versions a file may state (absent: 1, the version before it was required)
VERSIONS = (*sorted(UPCASTS), SPEC_VERSION)


def file_version(data: dict[str, Any]) -> int | None:
    """The schema version a pipeline file's mapping states (``spec_version``; absent:
    1), or ``None`` when it is not one of ``VERSIONS``."""
    version = data.get("spec_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in VERSIONS:
        return None
    return version


def _file_loc(loc: tuple[Any, ...], version: int) -> tuple[Any, ...]:
    """A validation error's location as the file spells it (a version 1 file has the
    keys version 2 renamed under their old names)."""
    if version == 1 and loc and loc[0] in RENAMED_V1:
        return (RENAMED_V1[loc[0]], *loc[1:])
    return loc


def _message(error: Any, version: int) -> str:
    if error["type"] != "extra_forbidden":
        return str(error["msg"])
    renamed = {old: new for new, old in RENAMED_V1.items()}
    loc = tuple(error["loc"])
    if version != 1 and len(loc) == 1 and loc[0] in renamed:
        return (f"unknown key: spec_version {SPEC_VERSION} calls it {renamed[loc[0]]} "
                f"(version 1 called it {loc[0]})")
    return "unknown key"


PACKAGE_PREFIX = "package:"


def _resolve(base: Path, given: Path) -> Path:
    """A model or card path: relative to the pipeline file's folder, absolute, or
    ``package:NAME/inner/path`` inside an installed Python package (a model published
    on PyPI: ``pip install`` it, name it; its SHA-256 is checked all the same)."""
    text = str(given)
    if not text.startswith(PACKAGE_PREFIX):
        return (base / given).resolve()
    from importlib import util

    package, _, inner = text[len(PACKAGE_PREFIX):].partition("/")
    try:
        found = util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise SpecError(f"package {package!r} is not installed (pip install it)")
    return (Path(next(iter(found.submodule_search_locations))) / inner).resolve()


def parse_pipeline(text: str, path: Path, *, check_model: bool = True) -> LoadedPipeline:
    """Validate pipeline YAML ``text`` (from ``path``; relative model paths resolve
    against its folder). Raises ``SpecError`` listing every problem with line and key."""
    from engine.steps import (  # the operator registry validates params
        OPERATORS,
        consistency_problems,
        replaced_operator,
    )

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: a pipeline file is a mapping (name:, version:, ...)")
    version = file_version(data)
    if version is None:
        raise _problems(path, root, [(("spec_version",), (
            f"not a schema version this Lastmile reads ({', '.join(map(str, VERSIONS))}; "
            f"the current one is {SPEC_VERSION})"))])
    try:
        spec = PipelineSpec.model_validate(upcast(data, version))
    except ValidationError as exc:
        errs = [(_file_loc(tuple(e["loc"]), version), _message(e, version))
                for e in exc.errors()]
        raise _problems(path, root, errs) from None
    problems: list[tuple[tuple[Any, ...], str]] = []
    params: list[BaseModel] = []
    for i, op in enumerate(spec.operators):
        replaced = replaced_operator(op.op, spec.task)  # MONAI's operator instead
        if replaced is not None:
            problems.append((("operators", i, "op"), replaced))
            continue
        if op.op not in OPERATORS:
            problems.append((("operators", i, "op"),
                         f"unknown operator {op.op!r}; known: {', '.join(sorted(OPERATORS))}"))
            continue
        operator = OPERATORS[op.op]
        if spec.task not in operator.tasks:
            problems.append((("operators", i, "op"),
                         f"operator {op.op!r} does not apply to task {spec.task}"))
        try:
            # MONAI's transforms are checked against MONAI's signature (steps.MonaiParams)
            check = getattr(operator.params, "check", operator.params.model_validate)
            params.append(check(op.params))
        except ValidationError as exc:
            for e in exc.errors():
                msg = "unknown parameter" if e["type"] == "extra_forbidden" else e["msg"]
                problems.append((("operators", i, "params", *e["loc"]), msg))
    if not problems:
        problems += consistency_problems(spec, params)
    base = path.parent
    try:
        model_path = _resolve(base, spec.model.path)
        card_path = _resolve(base, spec.model.card) if spec.model.card else None
    except SpecError as exc:
        raise _problems(path, root, [(("model", "path"), str(exc))]) from None
    if card_path is not None and not card_path.is_file():
        problems.append((("model", "card"), f"model card {card_path} does not exist"))
    if check_model:
        try:
            verify_model(model_path, spec.model.sha256)
        except ModelIntegrityError as exc:
            problems.append((("model", "sha256" if model_path.is_file() else "path"), str(exc)))
    extra_paths: dict[str, Path] = {}
    for name, m in spec.models.items():  # a cascade's further models
        try:
            extra_paths[name] = _resolve(base, m.path)
        except SpecError as exc:
            problems.append((("models", name, "path"), str(exc)))
            continue
        if check_model:
            try:
                verify_model(extra_paths[name], m.sha256)
            except ModelIntegrityError as exc:
                key = "sha256" if extra_paths[name].is_file() else "path"
                problems.append((("models", name, key), str(exc)))
    for i, prm in enumerate(params if len(params) == len(spec.operators) else ()):
        named = getattr(prm, "extra", {}).get("model")
        if named is not None and named not in spec.models:
            problems.append((("operators", i, "params", "model"),
                             f"no model {named!r} under models: "
                             f"({', '.join(sorted(spec.models)) or 'none'})"))
    if problems:
        raise _problems(path, root, problems)
    return LoadedPipeline(
        spec=spec,
        path=path,
        file_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        model_path=model_path,
        card_path=card_path,
        operator_params=tuple(params),
        text=text,
        model_paths=extra_paths,
    )


def load_pipeline(path: Path, *, check_model: bool = True) -> LoadedPipeline:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read pipeline file {path}: {exc.strerror}") from None
    return parse_pipeline(text, path.resolve(), check_model=check_model)


REFERENCE_DIR = Path(__file__).resolve().parent / "pipelines"


def discover(dirs: list[Path]) -> dict[str, LoadedPipeline]:
    """Every valid ``*.yaml`` pipeline in ``dirs`` by name (later dirs win).

    Invalid files raise: a worker must not start with a pipeline it cannot read.
    """
    found: dict[str, LoadedPipeline] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.yaml")):
            loaded = load_pipeline(path)
            found[loaded.name] = loaded
    return found
