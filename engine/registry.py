"""The events that change deployed pipelines; what is deployed now is their fold.

Deploying, changing a stage and retiring are facts in the log (who, why, which file
hash, and the file's own text so that every worker can run it). What is deployed *now*
is ``fold_pipelines(events)`` (``events.deployments``): a pure function, so a worker,
the receiver, the CLI and an auditor all derive the same answer from the same log.
"""

from __future__ import annotations

from engine.spec import LoadedPipeline
from events.base import deterministic_id
from events.catalogue import PipelineDeployed, PipelineRetired, PipelineStageChanged, Stage
from events.deployments import PIPELINE_EVENTS, DeployedPipeline, fold_pipelines

__all__ = ["PIPELINE_EVENTS", "DeployedPipeline", "deployed_event", "fold_pipelines",
           "retired_event", "stage_changed_event"]


def deployed_event(loaded: LoadedPipeline, *, actor: str, reason: str | None = None,
                   stage: Stage = Stage.STAGING) -> PipelineDeployed:
    """Deploying the same file twice is the same fact (deterministic id); the event
    carries the file's text and path, so a running worker without the file in its
    pipeline folders runs it from the log (its model must be at the resolved path)."""
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
        file_text=loaded.text,
        file_path=str(loaded.path),
        runtime_target_s=spec.targets.runtime_s,
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
