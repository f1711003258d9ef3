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


def services_for(settings: Settings) -> list[Service]:
    wanted = set(settings.services)
    services: list[Service] = []
    if "ingest" in wanted:
        services += services_ingest.ingest_services(settings)
    if "engine" in wanted:
        services += services_engine.engine_services(settings)
    if "projector" in wanted:
        services.append(services_projections.ProjectorService(settings))
    if "dashboard" in wanted:
        services.append(services_dashboards.DashboardService(settings))
        services += services_review.review_services(settings)
    if "xnat" in wanted:
        services += services_xnat.xnat_services(settings)
    return services
