"""Reading the rule language from YAML, refusing a document with the line and key of its
first problem (``RuleError``). ``ConditionParser`` is the part every rule file shares;
routing (``ingest.rules``) extends it with its own keys."""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydicom.datadict import dictionary_has_tag, keyword_for_tag, tag_for_keyword

from dicom_rules.conditions import (
    SERIES_TAGS,
    AllOf,
    AnyOf,
    Condition,
    Equals,
    Exists,
    Not,
    OneOf,
    Range,
    Regex,
)
from dicom_rules.errors import RuleError


class LineMap(dict[str, Any]):
    line: int = 0
    key_lines: dict[str, int]


class LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line of each key (for error messages)."""


def _construct_mapping(loader: LineLoader, node: yaml.MappingNode) -> LineMap:
    out = LineMap()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise RuleError(f"line {key_node.start_mark.line + 1}: keys must be text, "
                            f"got {key!r}")
        if key in out:
            raise RuleError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class ConditionParser:
    """Conditions from a ``LineLoader`` document; every refusal names source, line and key
    (raised as ``error``)."""

    #: the error type raised (a ``RuleError``); a user of the language may name its own
    error: type[RuleError] = RuleError

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: Any, path: str, message: str, key: str | None = None) -> RuleError:
        line = None
        if isinstance(node, LineMap):
            line = node.key_lines.get(key, node.line) if key else node.line
        where = f"{self.source}:{line}" if line else self.source
        return self.error(f"{where}: {path}: {message}")

    def mapping(self, node: Any, path: str, allowed: set[str]) -> LineMap:
        if not isinstance(node, LineMap):
            raise self.fail(None, path, f"expected a mapping, got {type(node).__name__}")
        for key in node:
            if key not in allowed:
                raise self.fail(node, f"{path}.{key}", f"unknown key {key!r} "
                                f"(expected one of: {', '.join(sorted(allowed))})", key)
        return node

    def tag(self, node: LineMap, path: str, series_only: bool) -> str:
        raw = node.get("tag")
        if not isinstance(raw, str) or not raw.strip():
            raise self.fail(node, f"{path}.tag", "a tag keyword or number is required", "tag")
        name = canonical_tag(raw)
        if name is None:
            raise self.fail(node, f"{path}.tag", f"unknown DICOM tag {raw!r}", "tag")
        if series_only and name not in SERIES_TAGS:
            raise self.fail(node, f"{path}.tag", f"a manifest can only use series tags "
                            f"({', '.join(sorted(SERIES_TAGS))}), not {name}", "tag")
        return name

    def condition(self, node: Any, path: str, series_only: bool = False) -> Condition:
        ops = {"equals", "one_of", "regex", "range", "exists"}
        node = self.mapping(node, path, {"all", "any", "not", "tag", *ops})
        combinators = [k for k in ("all", "any", "not") if k in node]
        if combinators:
            if len(node) != 1:
                raise self.fail(node, path, f"{combinators[0]!r} must stand alone in its "
                                "mapping", combinators[0])
            key = combinators[0]
            if key == "not":
                return Not(self.condition(node["not"], f"{path}.not", series_only))
            items = node[key]
            if not isinstance(items, list) or not items:
                raise self.fail(node, f"{path}.{key}", "expected a non-empty list", key)
            parsed = tuple(self.condition(it, f"{path}.{key}[{i}]", series_only)
                           for i, it in enumerate(items))
            return AllOf(parsed) if key == "all" else AnyOf(parsed)
        tag = self.tag(node, path, series_only)
        given = [k for k in ops if k in node]
        if len(given) != 1:
            raise self.fail(node, path, "exactly one of equals, one_of, regex, range, exists "
                            f"is required with a tag (got {sorted(given) or 'none'})")
        op = given[0]
        value = node[op]
        where = f"{path}.{op}"
        if op == "equals":
            if isinstance(value, list | dict) or value is None:
                raise self.fail(node, where, "expected one value", op)
            return Equals(tag, _text(value))
        if op == "one_of":
            if not isinstance(value, list) or not value:
                raise self.fail(node, where, "expected a non-empty list", op)
            return OneOf(tag, tuple(_text(v) for v in value))
        if op == "regex":
            if not isinstance(value, str):
                raise self.fail(node, where, "expected a regular expression string", op)
            try:
                return Regex(tag, re.compile(value))
            except re.error as exc:
                raise self.fail(node, where, f"invalid regular expression: {exc}", op) from None
        if op == "range":
            rng = self.mapping(value, where, {"min", "max"})
            lo, hi = rng.get("min"), rng.get("max")
            for k, v in (("min", lo), ("max", hi)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                    raise self.fail(rng, f"{where}.{k}", "expected a number", k)
            if lo is None and hi is None:
                raise self.fail(node, where, "give min, max or both", op)
            if lo is not None and hi is not None and lo > hi:
                raise self.fail(node, where, f"min {lo} is greater than max {hi}", op)
            return Range(tag, None if lo is None else float(lo), None if hi is None else float(hi))
        if not isinstance(value, bool):
            raise self.fail(node, where, "expected true or false", op)
        return Exists(tag, value)


def _text(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def canonical_tag(raw: str) -> str | None:
    """A keyword for known tags (``(0008,0060)`` -> ``Modality``), 8 hex digits otherwise."""
    raw = raw.strip()
    if tag_for_keyword(raw) is not None:
        return raw
    digits = re.sub(r"[\s(),]", "", raw)
    if re.fullmatch(r"[0-9A-Fa-f]{8}", digits):
        number = int(digits, 16)
        keyword = keyword_for_tag(number) if dictionary_has_tag(number) else ""
        return keyword or digits.upper()
    return None


def _lines(data: Any) -> Any:
    """Plain YAML data (dicts, lists) as ``LineMap``s without line numbers."""
    if isinstance(data, dict) and not isinstance(data, LineMap):
        out = LineMap({str(k): _lines(v) for k, v in data.items()})
        out.line, out.key_lines = 0, {}
        return out
    if isinstance(data, list):
        return [_lines(v) for v in data]
    return data


def parse_condition(data: Any, source: str, path: str) -> Condition:
    """One condition from already-loaded YAML data (a pipeline file's ``selection.when``),
    or ``RuleError`` naming ``path`` and the problem (the caller adds the line)."""
    return ConditionParser(source).condition(_lines(data), path)
