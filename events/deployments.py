"""What is deployed now, as a pure fold over the pipeline events of the log.

Deploying, changing a stage and retiring are facts in the log (who, why, which file
hash). Every running service derives the same answer from the same events: the engine
worker (which pipeline file to run), the DICOM receiver (which called AE titles are
ours) and the command line. It lives here, below ``ingest`` and ``engine``, because
both fold it and neither may import the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from events.base import Event
from events.catalogue import PipelineDeployed, PipelineRetired, PipelineStageChanged, Stage

#: the subject filter of every pipeline event (deployed, stage changed, retired)
PIPELINE_EVENTS = "lm.ev._.engine.pipeline.>"


@dataclass(frozen=True)
class DeployedPipeline:
    """One pipeline's current deployment.

    ``file_text`` and ``file_path`` are the deployed file's own text and where it was
    read from (relative model paths resolve against its folder); deployments recorded
    before they were carried have None, and run only from a worker's pipeline folders.
    """

    name: str
    version: str
    file_sha256: str
    model_sha256: str | None
    stage: Stage
    ae_title: str | None
    deployed_by: str
    retired: bool = False
    last_reason: str | None = None
    file_text: str | None = None
    file_path: str | None = None

    @property
    def active(self) -> bool:
        return not self.retired


def fold_pipelines(events: Iterable[Event]) -> dict[str, DeployedPipeline]:
    """Current state of every pipeline ever deployed (retired ones flagged).

    A deployment of the file already deployed (same name, same SHA-256, not retired)
    changes nothing: its stage, who deployed it and why stay as they were.
    """
    state: dict[str, DeployedPipeline] = {}
    for ev in events:
        if isinstance(ev, PipelineDeployed):
            cur = state.get(ev.name)
            if cur is not None and cur.active and cur.file_sha256 == ev.file_sha256:
                if cur.file_text is None and ev.file_text is not None:
                    state[ev.name] = replace(cur, file_text=ev.file_text,
                                             file_path=ev.file_path)
                continue
            state[ev.name] = DeployedPipeline(ev.name, ev.version, ev.file_sha256,
                                              ev.model_sha256, ev.stage, ev.ae_title,
                                              ev.actor, False, ev.reason, ev.file_text,
                                              ev.file_path)
        elif isinstance(ev, PipelineStageChanged) and ev.name in state:
            state[ev.name] = replace(state[ev.name], stage=ev.to_stage, last_reason=ev.reason)
        elif isinstance(ev, PipelineRetired) and ev.name in state:
            state[ev.name] = replace(state[ev.name], retired=True, last_reason=ev.reason)
    return state
