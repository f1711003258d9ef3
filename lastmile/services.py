"""Which services `lastmile up` runs beside NATS. Each later part (the DICOM SCP,
engine workers, the projector, the dashboard) adds its Service here."""

from __future__ import annotations

from lastmile.runtime import Service
from lastmile.settings import Settings


def services_for(settings: Settings) -> list[Service]:
    services: list[Service] = []
    return services
