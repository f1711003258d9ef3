"""Which services `lastmile up` runs beside NATS: the DICOM receiver and study-completion
detector, engine workers, the projector, the dashboard, and XNAT publishing and feedback
when an XNAT is configured."""

from __future__ import annotations

from lastmile import (
    services_dashboards,
    services_engine,
    services_ingest,
    services_projections,
    services_review,
    services_xnat,
)
from lastmile.runtime import Service
from lastmile.settings import Settings


def _as(role: str, services: list[Service]) -> list[Service]:
    """Run ``services`` as NATS user ``role`` (least permissions, ``events.nats_auth``)."""
    for service in services:
        service.nats_role = role
    return services


def services_for(settings: Settings) -> list[Service]:
    """The services of this host, each with the NATS role it publishes as. The dashboard
    hands its role's credential (``pages``) to the Streamlit process, and only that one."""
    wanted = set(settings.services)
    services: list[Service] = []
    if "ingest" in wanted:
        services += _as("ingest", services_ingest.ingest_services(settings))
    if "engine" in wanted:
        services += _as("engine", services_engine.engine_services(settings))
    if "projector" in wanted:
        services += _as("projector", [services_projections.ProjectorService(settings)])
    if "dashboard" in wanted:
        services += _as("pages", [services_dashboards.DashboardService(settings)])
        services += _as("review", services_review.review_services(settings))
    if "xnat" in wanted:
        services += _as("xnat", services_xnat.xnat_services(settings))
    return services
