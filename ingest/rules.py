"""Routing rules and series manifests as data: typed conditions on DICOM tags, never ``eval``.

A rules file (YAML) says which pipelines an instance goes to when it arrives on the
general AE title, and how each pipeline decides that a study is complete::

    version: 1
    rules:
      - id: mr-brain-bts
        priority: 10            # higher first; ties keep file order
        pipelines: [bts]
        when:
          all:
            - {tag: Modality, equals: MR}
            - any:
                - {tag: BodyPartExamined, one_of: [BRAIN, HEAD]}
                - {tag: StudyDescription, regex: "(?i)brain|head"}
      - id: store-only
        fallback: true          # applies only when no other rule matched
        pipelines: []
    pipelines:
      bts:
        ae_title: LM_BTS
        completion:
          quiet_period_s: 10
          expected_series:
            - {id: axial-flair, when: {tag: SeriesDescription, regex: "(?i)flair"}}

Conditions are the rule language of ``dicom_rules`` (shared with pipeline selection);
this module adds what routing needs: rules, pipelines and their completion policies.

Deployed pipelines come from the log too (``with_deployed``): a pipeline deployed with
``lastmile pipelines deploy`` gets its file's ``ae_title`` without a line here, and a
rule may name it (a name neither listed under ``pipelines:`` nor deployed is routed all
the same: the worker records ``engine.study.not_run`` for it, never a silent drop).
``route`` takes values and returns values. ``load_rules`` parses and validates a file
and refuses it with the line and key of the first problem.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from dicom_rules.conditions import Condition, TagValues, condition_tags, evaluate
from dicom_rules.errors import RuleError
from dicom_rules.parse import ConditionParser, LineLoader, LineMap
from events.deployments import DeployedPipeline
from ingest.errors import RulesError

DEFAULT_PIPELINE_AES: Mapping[str, str] = {"bts": "LM_BTS", "lts": "LM_LTS", "hfd": "LM_HFD"}
PIPELINE_NAME = r"[a-z][a-z0-9_-]{0,31}"


# --------------------------------------------------------------------------- rule set


@dataclass(frozen=True)
class Rule:
    id: str
    pipelines: tuple[str, ...]
    when: Condition | None
    priority: int = 0
    enabled: bool = True
    fallback: bool = False
    final: bool = False
    description: str = ""
    line: int | None = None


@dataclass(frozen=True)
class SeriesExpectation:
    """One entry of a manifest: "a series for which ``when`` holds is present"."""

    id: str
    when: Condition


@dataclass(frozen=True)
class CompletionPolicy:
    """How one pipeline decides a study is complete (``ingest.completion`` weighs the
    evidence; the reason and the evidence go into ``ingest.study.completed``). Every
    duration is in seconds of the completion service's own up-time, never wall time
    across a restart.

    - ``release_grace_s``: an association released normally after carrying every
      instance of the study (at least ``release_min_instances``), with every series'
      geometry contiguous, or the declared instance counts all present: complete this
      long after the release -> ``whole_study_released`` / ``declared_counts``.
    - ``release_min_instances``: a release is whole-study evidence only from this many
      instances on (a sender that opens one association per image never gives it).
    - ``expected_series``: the manifest; with one, completion (except ``max_wait``)
      waits until every entry has a matching series.
    - ``manifest_quiet_s``: a non-empty manifest is satisfied and no instance came
      for this long -> ``expected_series``.
    - ``quiet_period_s``: no instance for this long, the manifest is satisfied and no
      association that carried the study is open or aborted without a resend
      -> ``quiet_period``.
    - ``max_wait_s``: since the first instance -> ``max_wait``, whatever is missing; the
      completion is marked ``partial`` when an aborted (or never closed) association,
      a missing declared instance or a missing manifest entry is why it waited.
    - ``rerun_on_amend``: instances after completion give ``ingest.study.amended`` with
      ``rerun`` set to this, decided by the same evidence (``amend_quiet_s``, default
      ``quiet_period_s``, stands in for the quiet period).
    - ``on_changed_pixels``: a stored instance re-sent with other pixel data after the
      completion: ``rerun`` (whatever ``rerun_on_amend`` says) or ``stale`` (the result
      is marked stale and not re-run).
    """

    quiet_period_s: float = 10.0
    release_grace_s: float = 0.5
    release_min_instances: int = 2
    manifest_quiet_s: float = 1.0
    max_wait_s: float = 900.0
    expected_series: tuple[SeriesExpectation, ...] = ()
    rerun_on_amend: bool = True
    amend_quiet_s: float | None = None
    on_changed_pixels: str = "rerun"

    @property
    def amendment_quiet_s(self) -> float:
        return self.quiet_period_s if self.amend_quiet_s is None else self.amend_quiet_s


#: the reference pipelines' defaults, where the rules file says nothing (mercure waits
#: 60 s per series and 900 s per study; strong evidence makes us faster, weak as patient)
REFERENCE_POLICIES: dict[str, CompletionPolicy] = {
    "bts": CompletionPolicy(quiet_period_s=10.0, max_wait_s=900.0),
    "lts": CompletionPolicy(quiet_period_s=10.0, max_wait_s=900.0),
    # HFD analyses each radiograph: late ones re-run the study (the new result supersedes)
    "hfd": CompletionPolicy(quiet_period_s=5.0, max_wait_s=300.0, rerun_on_amend=True),
}


@dataclass(frozen=True)
class PipelineRoute:
    name: str
    ae_title: str | None
    completion: CompletionPolicy = field(default_factory=CompletionPolicy)


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    pipelines: Mapping[str, PipelineRoute]
    source: str = "<defaults>"
    sha256: str = ""

    def tags(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for rule in self.rules:
            if rule.when is not None:
                out |= condition_tags(rule.when)
        return out

    def undeclared(self) -> tuple[str, ...]:
        """Pipelines the rules name that are not listed under ``pipelines:`` (deployed
        ones, or a typo: ``RulesFile`` warns about those the log does not know)."""
        named = {p for r in self.rules for p in r.pipelines}
        return tuple(sorted(named - set(self.pipelines)))

    def ae_titles(self) -> dict[str, str]:
        """Called AE title -> pipeline, for the one-AE-per-pipeline titles."""
        return {p.ae_title: p.name for p in self.pipelines.values() if p.ae_title}

    def policy(self, pipeline: str) -> CompletionPolicy:
        route = self.pipelines.get(pipeline)
        if route is None:
            return REFERENCE_POLICIES.get(pipeline, CompletionPolicy())
        return route.completion


@dataclass(frozen=True)
class RouteDecision:
    """The outcome of routing one instance (or series): recorded as an event."""

    rule_ids: tuple[str, ...]
    pipelines: tuple[str, ...]
    reasons: tuple[str, ...]
    fallback: bool = False

    @property
    def matched(self) -> bool:
        return bool(self.rule_ids)


def route(rules: RuleSet, tags: TagValues) -> RouteDecision:
    """Evaluate the enabled rules by priority (higher first, then file order).

    Every matching rule adds its pipelines, until a matching rule marked ``final``. If
    none matched, the enabled fallback rules apply. No rule at all: unmatched.
    """
    ordered = sorted(
        (r for r in rules.rules if r.enabled and not r.fallback),
        key=lambda r: -r.priority,
    )
    ids: list[str] = []
    pipelines: list[str] = []
    reasons: list[str] = []
    for rule in ordered:
        assert rule.when is not None
        ok, why = evaluate(rule.when, tags)
        if not ok:
            continue
        ids.append(rule.id)
        reasons.append(f"{rule.id}: {why}")
        pipelines.extend(p for p in rule.pipelines if p not in pipelines)
        if rule.final:
            break
    if ids:
        return RouteDecision(tuple(ids), tuple(pipelines), tuple(reasons))
    for rule in rules.rules:
        if rule.enabled and rule.fallback:
            ids.append(rule.id)
            reasons.append(f"{rule.id}: fallback (no other rule matched)")
            pipelines.extend(p for p in rule.pipelines if p not in pipelines)
    return RouteDecision(tuple(ids), tuple(pipelines), tuple(reasons), fallback=bool(ids))


def manifest_status(
    policy: CompletionPolicy, series: Sequence[TagValues]
) -> tuple[bool, tuple[str, ...]]:
    """Whether every manifest entry has a series; returns (satisfied, missing ids)."""
    missing = tuple(
        exp.id
        for exp in policy.expected_series
        if not any(evaluate(exp.when, s)[0] for s in series)
    )
    return not missing, missing


def with_deployed(rules: RuleSet, deployed: Mapping[str, DeployedPipeline]
                  ) -> tuple[RuleSet, tuple[str, ...]]:
    """The rules in force: the file's, plus what the log has deployed (pure).

    - a deployed pipeline the file does not list gets a route with its file's AE title
      and the default completion policy (or the reference one for bts, lts, hfd);
    - a listed pipeline without an AE title takes the deployed one;
    - a retired pipeline's AE title is no longer ours (the receiver refuses it with
      "Called AE Title Not Recognized": nothing is accepted that would not run);
    - an AE title already used by another pipeline is not taken (a conflict, returned).

    Returns (rules, conflicts in our words). ``sha256`` covers the deployments too, so
    caches keyed on it (the receiver's routes) follow a deployment.
    """
    pipelines = dict(rules.pipelines)
    conflicts: list[str] = []
    for name, d in sorted(deployed.items()):
        route_now = pipelines.get(name)
        if d.retired:
            if route_now is not None and route_now.ae_title and route_now.ae_title == (
                    d.ae_title or DEFAULT_PIPELINE_AES.get(name)):
                pipelines[name] = replace(route_now, ae_title=None)
            continue
        used = {p.ae_title: p.name for p in pipelines.values() if p.ae_title}
        ae = d.ae_title
        if ae and used.get(ae, name) != name:
            conflicts.append(f"deployed pipeline {name}: AE title {ae} is already used by "
                             f"pipeline {used[ae]}; not taken")
            ae = None
        if route_now is None:
            pipelines[name] = PipelineRoute(
                name, ae, REFERENCE_POLICIES.get(name, CompletionPolicy()))
        elif route_now.ae_title is None and ae:
            pipelines[name] = replace(route_now, ae_title=ae)
    stamp = "\x1f".join(f"{n}:{d.file_sha256}:{d.retired}" for n, d in sorted(deployed.items()))
    sha = hashlib.sha256(f"{rules.sha256}\x1e{stamp}".encode()).hexdigest()
    return replace(rules, pipelines=pipelines, sha256=sha), tuple(conflicts)


def default_rules() -> RuleSet:
    """No rules file: the three reference pipelines' AE titles, nothing routed by tags."""
    return RuleSet(
        rules=(),
        pipelines={n: PipelineRoute(n, ae, REFERENCE_POLICIES.get(n, CompletionPolicy()))
                   for n, ae in DEFAULT_PIPELINE_AES.items()},
    )


# --------------------------------------------------------------------------- YAML


class _Parser(ConditionParser):
    error = RulesError

    def number(self, node: LineMap, key: str, path: str, default: float) -> float:
        value = node.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.fail(node, f"{path}.{key}", "expected a number >= 0", key)
        return float(value)

    def boolean(self, node: LineMap, key: str, path: str, default: bool) -> bool:
        value = node.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(node, f"{path}.{key}", "expected true or false", key)
        return value

    def completion(self, node: Any, path: str) -> CompletionPolicy:
        keys = {"quiet_period_s", "release_grace_s", "release_min_instances",
                "manifest_quiet_s", "max_wait_s", "expected_series", "rerun_on_amend",
                "amend_quiet_s", "on_changed_pixels"}
        node = self.mapping(node, path, keys)
        d = REFERENCE_POLICIES.get(path.split(".")[1], CompletionPolicy())
        expected: list[SeriesExpectation] = []
        raw = node.get("expected_series", [])
        if not isinstance(raw, list):
            raise self.fail(node, f"{path}.expected_series", "expected a list", "expected_series")
        for i, item in enumerate(raw):
            ipath = f"{path}.expected_series[{i}]"
            item = self.mapping(item, ipath, {"id", "when"})
            if not isinstance(item.get("id"), str):
                raise self.fail(item, f"{ipath}.id", "an id (text) is required", "id")
            if "when" not in item:
                raise self.fail(item, f"{ipath}.when", "a condition is required")
            expected.append(SeriesExpectation(item["id"], self.condition(
                item["when"], f"{ipath}.when", series_only=True)))
        policy = CompletionPolicy(
            quiet_period_s=self.number(node, "quiet_period_s", path, d.quiet_period_s),
            release_grace_s=self.number(node, "release_grace_s", path, d.release_grace_s),
            manifest_quiet_s=self.number(node, "manifest_quiet_s", path, d.manifest_quiet_s),
            max_wait_s=self.number(node, "max_wait_s", path, d.max_wait_s),
            expected_series=tuple(expected),
            rerun_on_amend=self.boolean(node, "rerun_on_amend", path, d.rerun_on_amend),
            amend_quiet_s=(self.number(node, "amend_quiet_s", path, 0.0)
                           if "amend_quiet_s" in node else d.amend_quiet_s),
            release_min_instances=int(self.number(
                node, "release_min_instances", path, d.release_min_instances)),
            on_changed_pixels=node.get("on_changed_pixels", d.on_changed_pixels),
        )
        if policy.on_changed_pixels not in ("rerun", "stale"):
            raise self.fail(node, f"{path}.on_changed_pixels", "expected rerun or stale",
                            "on_changed_pixels")
        if policy.max_wait_s < policy.quiet_period_s:
            raise self.fail(node, f"{path}.max_wait_s", "must not be shorter than "
                            "quiet_period_s", "max_wait_s")
        return policy

    def pipelines(self, node: Any) -> dict[str, PipelineRoute]:
        out = {n: PipelineRoute(n, ae, REFERENCE_POLICIES.get(n, CompletionPolicy()))
               for n, ae in DEFAULT_PIPELINE_AES.items()}
        if node is None:
            return out
        if not isinstance(node, LineMap):
            raise self.fail(None, "pipelines", "expected a mapping of pipeline name -> settings")
        seen_aes: dict[str, str] = {}
        for name, body in node.items():
            path = f"pipelines.{name}"
            if not re.fullmatch(PIPELINE_NAME, name):
                raise self.fail(node, path, "pipeline names are lower-case letters, digits, "
                                "- and _ (max 32)", name)
            body = self.mapping(body if body is not None else LineMap(), path,
                                {"ae_title", "completion"})
            ae = body.get("ae_title", DEFAULT_PIPELINE_AES.get(name))
            if ae is not None and (not isinstance(ae, str)
                                   or not re.fullmatch(r"[ -~]{1,16}", ae) or ae != ae.strip()):
                raise self.fail(body, f"{path}.ae_title", "an AE title is 1-16 printable "
                                "characters without leading/trailing spaces", "ae_title")
            if ae in seen_aes:
                raise self.fail(body, f"{path}.ae_title", f"AE title {ae} is already used by "
                                f"pipeline {seen_aes[ae]}", "ae_title")
            if ae:
                seen_aes[ae] = name
            policy = (self.completion(body["completion"], f"{path}.completion")
                      if "completion" in body
                      else REFERENCE_POLICIES.get(name, CompletionPolicy()))
            out[name] = PipelineRoute(name, ae, policy)
        return out

    def rules(self, node: Any, pipelines: Mapping[str, PipelineRoute]) -> tuple[Rule, ...]:
        if node is None:
            return ()
        if not isinstance(node, list):
            raise self.fail(None, "rules", "expected a list of rules")
        keys = {"id", "description", "priority", "enabled", "fallback", "final", "pipelines",
                "when"}
        out: list[Rule] = []
        ids: set[str] = set()
        for i, raw in enumerate(node):
            path = f"rules[{i}]"
            item = self.mapping(raw, path, keys)
            rid = item.get("id")
            if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", rid):
                raise self.fail(item, f"{path}.id", "an id of letters, digits, _ . : - "
                                "(max 64) is required", "id")
            if rid in ids:
                raise self.fail(item, f"{path}.id", f"duplicate rule id {rid!r}", "id")
            ids.add(rid)
            path = f"rules[{i}] ({rid})"
            fallback = self.boolean(item, "fallback", path, False)
            targets = item.get("pipelines", [])
            if not isinstance(targets, list) or not all(isinstance(p, str) for p in targets):
                raise self.fail(item, f"{path}.pipelines", "expected a list of pipeline names",
                                "pipelines")
            for p in targets:
                if not re.fullmatch(PIPELINE_NAME, p):
                    raise self.fail(item, f"{path}.pipelines", f"{p!r} is not a pipeline "
                                    "name (lower-case letters, digits, - and _, max 32; "
                                    "a pipeline listed under `pipelines:` or deployed)",
                                    "pipelines")
            if not targets and not fallback:
                raise self.fail(item, f"{path}.pipelines", "a rule needs at least one pipeline "
                                "(only a fallback rule may route to none)", "pipelines")
            when = None
            if "when" in item:
                when = self.condition(item["when"], f"{path}.when")
            elif not fallback:
                raise self.fail(item, f"{path}.when", "a condition is required (only a "
                                "fallback rule has none)")
            priority = item.get("priority", 0)
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise self.fail(item, f"{path}.priority", "expected an integer", "priority")
            description = item.get("description", "")
            if not isinstance(description, str):
                raise self.fail(item, f"{path}.description", "expected text", "description")
            out.append(Rule(
                id=rid, pipelines=tuple(targets), when=when, priority=priority,
                enabled=self.boolean(item, "enabled", path, True), fallback=fallback,
                final=self.boolean(item, "final", path, False), description=description,
                line=item.line,
            ))
        return tuple(out)


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Parse and validate a rules document, or raise ``RulesError`` with line and key."""
    try:
        doc = yaml.load(text, Loader=LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RulesError(f"{source}{line}: not valid YAML: {exc.problem}") from None
    except RuleError as exc:
        raise RulesError(f"{source}: {exc}") from None
    if doc is None:
        doc = LineMap()
        doc.line, doc.key_lines = 1, {}
    p = _Parser(source)
    doc = p.mapping(doc, "(top level)", {"version", "rules", "pipelines"})
    if doc.get("version", 1) != 1:
        raise p.fail(doc, "version", f"unsupported version {doc.get('version')!r} "
                     "(this Lastmile reads version 1)", "version")
    pipelines = p.pipelines(doc.get("pipelines"))
    rules = p.rules(doc.get("rules"), pipelines)
    return RuleSet(rules=rules, pipelines=pipelines, source=source,
                   sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def load_rules(path: Path) -> RuleSet:
    """Read and validate a rules file (the one place this module touches the disk)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot read the rules file ({exc.strerror})") from None
    return parse_rules(text, str(path))


EXAMPLE_RULES = Path(__file__).with_name("rules.example.yaml")
