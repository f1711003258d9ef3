"""Which services `lastmile up` runs beside NATS: the DICOM receiver and study-completion
detector, engine workers, the projector, the dashboard, and XNAT publishing and feedback
when an XNAT is configured."""

from __future__ import annotations

from lastmile import (
    dashboards_wiring,
    engine_wiring,
    ingest_wiring,
    projections_wiring,
    review_wiring,
    xnat_wiring,
)
from lastmile.runtime import Service
from lastmile.settings import Settings


def services_for(settings: Settings) -> list[Service]:
    wanted = set(settings.services)
    services: list[Service] = []
    if "ingest" in wanted:
        services += ingest_wiring.ingest_services(settings)
    if "engine" in wanted:
        services += engine_wiring.engine_services(settings)
    if "projector" in wanted:
        services.append(projections_wiring.ProjectorService(settings))
    if "dashboard" in wanted:
        services.append(dashboards_wiring.DashboardService(settings))
        services += review_wiring.review_services(settings)
    if "xnat" in wanted:
        services += xnat_wiring.xnat_services(settings)
    return services
