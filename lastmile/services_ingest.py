"""Ingest's services for ``lastmile up``: the DICOM Storage SCP and the study-completion
detector, sharing one app; ``rules_path`` says which routing rules file applies."""

from __future__ import annotations

import asyncio
from pathlib import Path

from events.jetstream import EventBus
from ingest.app import IngestApp, IngestOptions
from ingest.dicom_scp import ScpConfig
from ingest.errors import IngestError
from ingest.rules import EXAMPLE_RULES
from ingest.rules_file import RulesFile
from ingest.tls import TlsFiles
from lastmile.runtime import Service
from lastmile.settings import ConfigError, Settings

# --------------------------------------------------------------------------- settings


def rules_path(settings: Settings) -> Path:
    """The configured rules file, else the shipped example (the paper's three pipelines)."""
    return settings.routing_rules or EXAMPLE_RULES


def dicom_tls(settings: Settings) -> TlsFiles | None:
    """The receiver's TLS files, or None; half a pair is a configuration error."""
    if settings.dicom_tls_cert is None and settings.dicom_tls_key is None:
        if settings.dicom_tls_ca is not None:
            raise ConfigError("LASTMILE_DICOM_TLS_CA is set but LASTMILE_DICOM_TLS_CERT and "
                              "LASTMILE_DICOM_TLS_KEY are not: the receiver needs both for TLS")
        return None
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        raise ConfigError("set both LASTMILE_DICOM_TLS_CERT and LASTMILE_DICOM_TLS_KEY "
                          "for DICOM TLS")
    return TlsFiles(settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_ca)


def ingest_options(settings: Settings) -> IngestOptions:
    return IngestOptions(
        instances_dir=settings.instances_dir,
        scp=ScpConfig(
            host=settings.dicom_host,
            port=settings.dicom_port,
            general_ae=settings.dicom_general_ae,
            max_pdu=settings.dicom_max_pdu,
            max_associations=settings.dicom_max_associations,
            allowed_calling_aes=tuple(settings.dicom_allowed_calling_aes),
            allowed_addresses=tuple(settings.dicom_allowed_addresses),
            request_timeout_s=settings.dicom_request_timeout_s,
            max_pending=settings.dicom_max_pending,
            max_connections_per_address=settings.dicom_max_connections_per_address,
            tls=dicom_tls(settings),
            chunked_receive=settings.dicom_receive_to_disk,
        ),
        rules_path=rules_path(settings),
        max_instance_bytes=settings.dicom_max_instance_mb * 2**20,
        min_free_bytes=settings.dicom_min_free_mb * 2**20,
        publish_timeout_s=settings.dicom_publish_timeout_s,
    )


# --------------------------------------------------------------------------- services


class ScpService(Service):
    """The DICOM Storage SCP (store + acked event before Success)."""

    name = "dicom-scp"

    def __init__(self, app: IngestApp) -> None:
        self.app = app

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        await self.app.scp.run(bus, stop)


class CompletionService(Service):
    """Study completion: folds the log at start, then follows it."""

    name = "study-completion"

    def __init__(self, app: IngestApp) -> None:
        self.app = app

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        await self.app.run_detector(bus, stop)


def ingest_services(settings: Settings) -> list[Service]:
    """Both services share one app (and its rules); the detector reads association facts
    from the log, as it would from receivers in other processes."""
    options = ingest_options(settings)
    try:
        rules = RulesFile.open(options.rules_path)
    except IngestError as exc:  # an invalid rules file at start: a configuration error
        raise ConfigError(f"routing rules: {exc}") from None
    app = IngestApp(options, settings.secret(), rules)
    return [ScpService(app), CompletionService(app)]
