"""The review pages' side of the composition root: ``review_config`` from the settings,
the PACS deep link, registering a blinded reader's mask, and the case-assignment service.

Case assignment: ``CaseAssignmentService`` (durable consumer ``review-assigner``) turns
each ``InferenceCompleted`` (or, for QC-gated pipelines such as HFD, each ``QcPassed``)
into one ``CaseAssigned`` per reader of the pipeline in the users file, with ids derived
from (run, reader): a redelivery or a second assigner adds nothing
(``dashboards.review.policy.assignments``).

Settings (environment, read by ``dashboards.config.ReviewConfig``): ``LASTMILE_USERS_FILE``
(default ``<state_dir>/users.toml``), ``LASTMILE_AUTH_PROXY_HEADER``, ``LASTMILE_DEMO``,
``LASTMILE_BLINDED_STUDY``, ``LASTMILE_QC_PIPELINES`` (``hfd``), ``LASTMILE_PUBLIC_URL``
(the dashboard's address as PACS reaches it, for `lastmile link`), and
``LASTMILE_DASHBOARD_STATE_DIR`` (set for the Streamlit process: where the instance
store and results are).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from dashboards.config import (
    ENV_STATE_DIR,
    ReviewConfig,
)
from dashboards.review import dicom_files
from dashboards.review.auth import (
    AuthError,
    User,
    load_users,
    parse_roles,
)
from dashboards.review.policy import (
    ReviewRefused,
    assignments,
    build_edit,
    cases_of_study,
    current_cases,
)
from events.base import Event
from events.catalogue import InferenceCompleted, QcPassed
from events.instance_store import InstanceStore
from events.jetstream import Delivery, EventBus
from events.subjects import type_filter
from lastmile.runtime import Service
from lastmile.settings import Settings

log = logging.getLogger("lastmile.review")

ASSIGNER_DURABLE = "review-assigner"


def review_config(settings: Settings, environ: dict[str, str] | None = None) -> ReviewConfig:
    env = dict(os.environ if environ is None else environ)
    env.setdefault(ENV_STATE_DIR, str(settings.state_dir))
    return ReviewConfig.from_env(env)


# --------------------------------------------------------------------------- deep link


def deep_link(cfg: ReviewConfig, study_uid: str, *, dashboard_port: int = 8501,
              ours: bool = False) -> str:
    """The stable URL PACS opens for a study: the XNAT session when XNAT is configured
    (what the paper's Visage buttons did), else our case page."""
    if cfg.xnat_url and not ours:
        from engine.xnat_publisher import session_label

        return (f"{cfg.xnat_url}/data/projects/{cfg.xnat_project}/experiments/"
                f"{session_label(study_uid)}?format=html")
    base = cfg.public_url or f"http://127.0.0.1:{dashboard_port}"
    return f"{base}/case?study={study_uid}"


# --------------------------------------------------------------------------- blinded masks


async def add_mask(bus: EventBus, cfg: ReviewConfig, study_uid: str, source: str, data: bytes,
                   actor: str, run_key: str | None = None) -> Event:
    """Register an expert/novice SEG of a study's current result for blinded reading:
    validated like an edit, stored in the instance store, recorded as ``EditSubmitted``
    with ``source`` = the mask's origin."""
    events = [e for _, e in await bus.history(study_uid)]
    cases = cases_of_study(events)
    current = [cases[run_key]] if run_key and run_key in cases else current_cases(cases)
    seg_cases = [c for c in current if any(Path(k).name.startswith("seg-")
                                           for k in c.result.result_keys)]
    if len(seg_cases) != 1:
        raise ReviewRefused(f"study {study_uid} has {len(seg_cases)} current results with a "
                            "segmentation; name one with --run")
    case = seg_cases[0]
    ai_seg = next(cfg.results_dir / k for k in case.result.result_keys
                  if Path(k).name.startswith("seg-"))
    dicom_files.validate_edit(data, ai_seg_path=ai_seg, study_uid=study_uid,
                              source_series=case.result.selected_series)
    stored = InstanceStore(cfg.instances_dir).put([data])
    admin = User(actor, parse_roles(["admin"]))
    ev = build_edit(case, admin, store_key=stored.store_key, sha256=stored.sha256,
                    source=source)
    await bus.publish(ev)
    return ev


# --------------------------------------------------------------------------- assignment


class CaseAssignmentService(Service):
    """Assigns each new result (after QC for gated pipelines) to its pipeline's readers."""

    name = "review-assigner"

    def __init__(self, cfg: ReviewConfig) -> None:
        self.cfg = cfg

    def readers(self, pipeline: str) -> list[str]:
        try:
            return load_users(self.cfg.users_file).readers_of(pipeline)
        except AuthError as exc:
            log.error("users file: %s; no assignment made", exc)
            raise

    async def handle(self, bus: EventBus, event: Event) -> int:
        if not isinstance(event, InferenceCompleted | QcPassed) or not event.pipeline:
            return 0
        made = assignments(event, self.readers(event.pipeline),
                           qc_pipelines=self.cfg.qc_pipelines)
        for ev in made:
            await bus.publish(ev)
        return len(made)

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        async def handler(event: Event, delivery: Delivery) -> None:
            await self.handle(bus, event)

        await bus.consume(ASSIGNER_DURABLE, handler, filter_subjects=[
            type_filter(InferenceCompleted.type_name()), type_filter(QcPassed.type_name())],
            stop=stop, max_attempts=5, ack_wait_s=30.0)


def review_services(settings: Settings) -> list[Service]:
    return [CaseAssignmentService(review_config(settings))]
