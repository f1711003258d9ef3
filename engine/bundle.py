"""MONAI bundle folder -> pipeline file (``lastmile pipelines from-bundle DIR``).

A MONAI bundle (https://docs.monai.io/en/stable/mb_specification.html) holds
``configs/metadata.json`` (name, version, ``network_data_format``: input modality, output
channels and their meaning), ``configs/inference.json`` (or ``.yaml``: ``preprocessing``,
``inferer``, ``postprocessing`` as MONAI config objects with ``_target_``) and
``models/model.ts`` (TorchScript) or ``models/model.pt``. ``from_bundle`` maps the
bundle's own dictionary transforms to the pipeline file's MONAI operators (``Spacingd`` ->
``Spacing``, ``keys`` dropped), its inferer, labels and model (path + SHA-256), and names
every part it could not map. Pure: reads the folder, returns text; nothing is imported from
the bundle and no config expression (``$...``) is evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import SpecError
from engine.ops import transforms
from engine.pipeline_model import SPEC_VERSION

#: dictionary-transform keys that only say which item of the data dictionary is meant
_DICT_ONLY = {"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "source_key",
              "orig_keys", "orig_meta_keys", "nearest_interp", "to_tensor", "device",
              "output_dir", "output_postfix", "resample", "separate_folder", "output_ext",
              "output_dtype", "squeeze_end_dims", "data_root_dir", "print_log", "transform",
              "image_only", "reader", "ensure_channel_first", "dtype", "track_meta",
              "channel_dim", "strict_check"}
#: what Lastmile does itself: loading a DICOM series channel-first as float32
_IMPLICIT = {"LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "ToDevice",
             "AddChannel", "CastToType", "SaveImage", "Activations", "AsDiscrete", "Invert",
             "CopyItems", "DeleteItems", "ToNumpy"}
_MODALITY = {"MRI": "MR", "MR": "MR", "CT": "CT", "PET": "PT", "PT": "PT", "US": "US"}


@dataclass
class Conversion:
    """A pipeline file made from a bundle, and what of the bundle it does not carry."""

    text: str
    unmapped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None


def _resolve(value: Any, config: dict[str, Any], depth: int = 0) -> Any:
    """``@name`` references to the config's top-level items, recursively; ``$``
    expressions are left as they are (never evaluated)."""
    if depth > 20:
        return value
    if isinstance(value, str) and value.startswith("@") and value[1:] in config:
        return _resolve(config[value[1:]], config, depth + 1)
    if isinstance(value, list):
        return [_resolve(v, config, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, config, depth + 1) for k, v in value.items()}
    return value


def _target(item: Any) -> str | None:
    if isinstance(item, dict) and isinstance(item.get("_target_"), str):
        return str(item["_target_"]).rsplit(".", 1)[-1]
    return None


def _transforms_of(block: Any) -> list[Any]:
    if _target(block) == "Compose":
        return list(block.get("transforms") or [])
    if isinstance(block, list):
        return block
    return [] if block is None else [block]


def _params(item: dict[str, Any], name: str, unmapped: list[str]) -> dict[str, Any] | None:
    """The item's parameters without dictionary keys; per-key lists take the image's
    (the first) value. None (and a line in ``unmapped``) when one is an expression."""
    out: dict[str, Any] = {}
    multi_key = isinstance(item.get("keys"), list) and len(item["keys"]) > 1
    for k, v in item.items():
        if k.startswith("_") or k in _DICT_ONLY:
            continue
        if isinstance(v, str) and v.startswith("$"):
            unmapped.append(f"{name}: parameter {k!r} is a config expression")
            return None
        if multi_key and isinstance(v, list) and len(v) == len(item["keys"]) \
                and all(isinstance(x, str) for x in v):
            v = v[0]
        out[k] = v
    return out


def _operators(config: dict[str, Any], section: str, allowed: tuple[str, ...],
               unmapped: list[str]) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """The transforms of ``config[section]`` as pipeline operators (the dictionary
    transform's plain name if it is in ``allowed``), and those Lastmile does itself
    (``_IMPLICIT``) as ``(name, item)`` for the caller to read. What is neither, or not a
    MONAI config object, is added to ``unmapped``."""
    ops: list[dict[str, Any]] = []
    implicit: list[tuple[str, Any]] = []
    for item in _transforms_of(config.get(section)):
        name = _target(item)
        if name is None:
            unmapped.append(f"{section}: {str(item)[:60]} (not a MONAI config object)")
            continue
        plain = name[:-1] if name.endswith("d") else name
        if plain in allowed:
            params = _params(item, name, unmapped)
            if params is not None:
                ops.append({"op": plain, "params": params} if params else {"op": plain})
        elif plain in _IMPLICIT or name in _IMPLICIT:
            implicit.append((name, item))
        else:
            unmapped.append(f"{section}: {name}")
    return ops, implicit


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")
    return (slug if slug[:1].isalpha() else f"b-{slug}")[:32].rstrip("-") or "bundle"


def from_bundle(bundle: Path, out_file: Path) -> Conversion:
    """Map ``bundle`` to the text of a pipeline file to be written at ``out_file`` (the
    model path is relative to its folder). Raises ``SpecError`` for a folder that is not
    a MONAI bundle (no metadata, no inference config, no model)."""
    meta = _read(bundle / "configs" / "metadata.json")
    config_path = next((bundle / "configs" / f"inference.{ext}"
                        for ext in ("json", "yaml", "yml")
                        if (bundle / "configs" / f"inference.{ext}").is_file()), None)
    if config_path is None:
        raise SpecError(f"{bundle}: no configs/inference.json (or .yaml): not a MONAI bundle")
    config = _read(config_path)
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise SpecError(f"{bundle}: metadata and inference configs are mappings")
    model = next((bundle / "models" / n for n in ("model.ts", "model.pt2", "model.pt")
                  if (bundle / "models" / n).is_file()), None)
    if model is None:
        raise SpecError(f"{bundle}: no models/model.ts (or .pt2, .pt)")
    unmapped: list[str] = []
    notes: list[str] = []
    if model.name == "model.pt":
        notes.append("models/model.pt: the torch runtime loads it only if it is a "
                     "TorchScript program (a state dict needs the bundle's network_def)")

    fmt = meta.get("network_data_format") or {}
    inputs = (fmt.get("inputs") or {}).get("image") or {}
    outputs = (fmt.get("outputs") or {}).get("pred") or {}
    channels = {int(k): str(v) for k, v in (outputs.get("channel_def") or {}).items()}
    classes = int(outputs.get("num_channels") or max(channels, default=1) + 1)
    labels = {k: _slug(v).replace("-", "_") for k, v in channels.items() if k > 0}
    if not labels:
        labels = {k: f"label_{k}" for k in range(1, classes)}
        notes.append("metadata names no output channels: labels label_1.. used")

    config = {k: _resolve(v, config) for k, v in config.items()}
    pre, _ = _operators(config, "preprocessing", transforms.IMAGE_TRANSFORMS, unmapped)
    ops: list[dict[str, Any]] = [{"op": "select_series"}, {"op": "load_volume"}, *pre]
    spatial = any(op["op"] in transforms.SPATIAL_TRANSFORMS for op in pre)
    inferer = config.get("inferer")
    name = _target(inferer) or "SlidingWindowInferer"
    params: dict[str, Any] | None
    if name not in transforms.INFERERS:
        unmapped.append(f"inferer: {name} (SimpleInferer used)")
        name, params = "SimpleInferer", {}
    else:
        params = _params(inferer, name, unmapped) if isinstance(inferer, dict) else {}
        if params is None:
            name, params = "SimpleInferer", {}
    ops.append({"op": name, "params": {**params, "classes": classes}})
    if spatial:
        ops.append({"op": "Invert"})
    discrete = "argmax"
    post, implicit = _operators(config, "postprocessing", transforms.LABEL_TRANSFORMS,
                                unmapped)
    for pname, item in implicit:
        if pname.startswith("Activations") and item.get("sigmoid"):
            unmapped.append(f"postprocessing: {pname} sigmoid (Lastmile applies softmax)")
        elif pname.startswith("AsDiscrete") and item.get("threshold") is not None \
                and not item.get("argmax"):
            discrete = "threshold"
    ops.append({"op": discrete})
    ops += post
    ops += [{"op": "volumes"}, {"op": "write_seg"}, {"op": "write_sr"}]

    bundle_name = str(meta.get("name") or bundle.name)
    slug = _slug(bundle_name)
    modality = _MODALITY.get(str(inputs.get("modality", "")).upper())
    rel_model = os.path.relpath(model.resolve(), out_file.resolve().parent)
    pipeline = {
        "spec_version": SPEC_VERSION,
        "name": slug,
        "version": str(meta.get("version") or "0.0.0")[:32],
        "description": f"MONAI bundle {bundle_name}"[:200],
        "task": "segmentation3d",
        "ae_title": re.sub(r"[^A-Z0-9_]", "_", slug.upper())[:16],
        "selection": {"modalities": [modality]} if modality else {},
        "operators": ops,
        "model": {"name": slug[:64], "version": str(meta.get("version") or "0.0.0")[:64],
                  "path": rel_model,
                  "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                  "labels": labels,
                  # what Lastmile's own steps do with it: softmax over the channels
                  "output": {"values": "logits", "activation": "softmax",
                             "channels": classes}},
        "runtime": "torch",
        "results": {"seg": True, "sr": True,
                    "series_description": f"AI {bundle_name}"[:64]},
    }
    if modality is None:
        notes.append("metadata names no input modality: selection takes any series")
    head = [f"# Made by `lastmile pipelines from-bundle` from the MONAI bundle {bundle_name}",
            f"# ({bundle.name}/configs/{config_path.name}); review selection and input:"]
    head += [f"# not mapped: {u}" for u in unmapped]
    head += [f"# note: {n}" for n in notes]
    body = yaml.safe_dump(pipeline, sort_keys=False, default_flow_style=None, width=100)
    return Conversion("\n".join(head) + "\n" + body, unmapped, notes)
