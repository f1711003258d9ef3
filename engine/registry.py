"""Deployed pipelines as a fold over pipeline events; the events that change them.

Deploying, changing a stage and retiring are facts in the log (who, why, which file
hash). What is deployed *now* is ``fold_pipelines(events)``: a pure function, so a
worker, the CLI and an auditor all derive the same answer from the same log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from engine.spec import LoadedPipeline
from events.base import Event, deterministic_id
from events.catalogue import PipelineDeployed, PipelineRetired, PipelineStageChanged, Stage

PIPELINE_EVENTS = "lm.ev._.engine.pipeline.>"


@dataclass(frozen=True)
class DeployedPipeline:
    name: str
    version: str
    file_sha256: str
    model_sha256: str | None
    stage: Stage
    ae_title: str | None
    deployed_by: str
    retired: bool = False
    last_reason: str | None = None


def fold_pipelines(events: Iterable[Event]) -> dict[str, DeployedPipeline]:
    """Current state of every pipeline ever deployed (retired ones flagged)."""
    state: dict[str, DeployedPipeline] = {}
    for ev in events:
        if isinstance(ev, PipelineDeployed):
            state[ev.name] = DeployedPipeline(ev.name, ev.version, ev.file_sha256,
                                              ev.model_sha256, ev.stage, ev.ae_title,
                                              ev.actor, False, ev.reason)
        elif isinstance(ev, PipelineStageChanged) and ev.name in state:
            state[ev.name] = replace(state[ev.name], stage=ev.to_stage, last_reason=ev.reason)
        elif isinstance(ev, PipelineRetired) and ev.name in state:
            state[ev.name] = replace(state[ev.name], retired=True, last_reason=ev.reason)
    return state


def deployed_event(loaded: LoadedPipeline, *, actor: str, reason: str | None = None,
                   stage: Stage = Stage.STAGING) -> PipelineDeployed:
    """Deploying the same file twice is the same fact (deterministic id)."""
    spec = loaded.spec
    return PipelineDeployed.new(
        actor=actor,
        pipeline=spec.name,
        event_id=deterministic_id("pipeline.deployed", spec.name, loaded.file_sha256,
                                  stage.value),
        name=spec.name,
        version=spec.version,
        file_sha256=loaded.file_sha256,
        model_sha256=spec.model.sha256,
        stage=stage,
        ae_title=spec.ae_title,
        model_card=str(loaded.card_path) if loaded.card_path else None,
        reason=reason,
    )


def stage_changed_event(current: DeployedPipeline, to_stage: Stage, *, actor: str,
                        reason: str) -> PipelineStageChanged:
    if not reason.strip():
        raise ValueError("a stage change needs a reason (it is the audit trail)")
    if current.retired:
        raise ValueError(f"pipeline {current.name} is retired; deploy it again first")
    return PipelineStageChanged.new(actor=actor, pipeline=current.name, name=current.name,
                                    version=current.version, from_stage=current.stage,
                                    to_stage=to_stage, reason=reason)


def retired_event(current: DeployedPipeline, *, actor: str, reason: str) -> PipelineRetired:
    return PipelineRetired.new(actor=actor, pipeline=current.name, name=current.name,
                               version=current.version, reason=reason)
