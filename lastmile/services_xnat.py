"""XNAT's services for `lastmile up`: the publisher and the feedback poller.

Both services run only when an XNAT URL is configured; without one, results stay in
Lastmile's own review pages.

Settings (environment; read here, not in ``lastmile.settings``, so the shared settings
object stays untouched):

=================================  ========================================================
``LASTMILE_XNAT_URL``              XNAT base URL; unset = no XNAT services
``LASTMILE_XNAT_PROJECT``          project ID (created if missing), default ``LASTMILE``
``LASTMILE_XNAT_USER``             user; with ``LASTMILE_XNAT_PASSWORD``. Both unset: the
``LASTMILE_XNAT_PASSWORD``         client reads ``.netrc`` (``LASTMILE_XNAT_NETRC`` or
``LASTMILE_XNAT_NETRC``            ``~/.netrc``). Never logged.
``LASTMILE_XNAT_VERIFY``           verify TLS certificates (default true)
``LASTMILE_XNAT_TIMEOUT_S``        per-request timeout (default 30)
``LASTMILE_XNAT_POLL_S``           feedback poll interval (default 60)
``LASTMILE_XNAT_BACKOFF_S``        first retry delay, doubled per attempt (default 2)
``LASTMILE_XNAT_MAX_BACKOFF_S``    longest retry delay (default 300)
``LASTMILE_XNAT_MAX_DELIVERIES``   redeliveries from the log before dead-lettering (10)
=================================  ========================================================
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from engine.xnat_publisher import (
    PublisherConfig,
    XnatPublisher,
)
from events.instance_store import InstanceStore
from events.jetstream import EventBus
from events.subjects import type_filter
from ingest.xnat_feedback import XnatFeedbackPoller
from lastmile.runtime import Service
from lastmile.settings import ConfigError, Settings
from xnat_client.session import XnatAccess

PUBLISHER_DURABLE = "xnat-publisher"


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment LASTMILE_XNAT_VERIFY: {value!r} is not true/false")


def _number(env: Mapping[str, str], key: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment {key}: {raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"environment {key}: must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class XnatSettings(XnatAccess):
    """The XNAT part's settings (one validated object, passed in): where and as whom
    (``XnatAccess``, whose ``url`` is empty when XNAT is not configured) and how often."""

    url: str = ""
    poll_s: float = 60.0
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    max_deliveries: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> XnatSettings:
        e = os.environ if env is None else env
        url = (e.get("LASTMILE_XNAT_URL") or "").strip()
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"environment LASTMILE_XNAT_URL: {url!r} is not an http(s) URL")
        return cls(
            url=url,
            project=e.get("LASTMILE_XNAT_PROJECT") or "LASTMILE",
            user=e.get("LASTMILE_XNAT_USER") or None,
            password=e.get("LASTMILE_XNAT_PASSWORD") or None,
            netrc_file=e.get("LASTMILE_XNAT_NETRC") or None,
            verify=_flag(e.get("LASTMILE_XNAT_VERIFY", "true")),
            timeout_s=_number(e, "LASTMILE_XNAT_TIMEOUT_S", 30.0, minimum=0.1),
            poll_s=_number(e, "LASTMILE_XNAT_POLL_S", 60.0, minimum=0.1),
            backoff_s=_number(e, "LASTMILE_XNAT_BACKOFF_S", 2.0),
            max_backoff_s=_number(e, "LASTMILE_XNAT_MAX_BACKOFF_S", 300.0),
            max_deliveries=int(_number(e, "LASTMILE_XNAT_MAX_DELIVERIES", 10, minimum=1)),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def access(self) -> XnatAccess:
        """Just where and as whom (what the publisher and the poller are given)."""
        assert self.url, "XNAT is not configured"
        return XnatAccess(**{f.name: getattr(self, f.name) for f in fields(XnatAccess)})


class XnatPublisherService(Service):
    """Consumes ``engine.inference.completed`` and publishes each result to XNAT."""

    name = "xnat-publisher"

    def __init__(self, settings: Settings, xnat: XnatSettings) -> None:
        self.settings = settings
        self.xnat = xnat
        self.publisher: XnatPublisher | None = None

    def config(self) -> PublisherConfig:
        return PublisherConfig(target=self.xnat.access(), results_dir=self.settings.results_dir,
                               instances_dir=self.settings.instances_dir,
                               backoff_s=self.xnat.backoff_s,
                               max_backoff_s=self.xnat.max_backoff_s,
                               max_deliveries=self.xnat.max_deliveries)

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        config = self.config()
        self.publisher = XnatPublisher(config).bind(bus, stop)
        # the handler heart-beats while it works and backs off, so a long ack wait is
        # only the bound for a publisher that died mid-way
        try:
            await bus.consume(PUBLISHER_DURABLE, self.publisher.handle,
                              filter_subjects=[type_filter("engine.inference.completed"),
                                               type_filter("engine.result.superseded")],
                              max_attempts=config.max_deliveries, ack_wait_s=60.0, stop=stop)
        finally:
            await asyncio.to_thread(self.publisher.connection.close)


class XnatFeedbackService(Service):
    """Polls XNAT for reviews and corrected segmentations."""

    name = "xnat-feedback"

    def __init__(self, settings: Settings, xnat: XnatSettings) -> None:
        self.settings = settings
        self.xnat = xnat
        self.poller: XnatFeedbackPoller | None = None

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        self.poller = XnatFeedbackPoller(self.xnat.access(),
                                         InstanceStore(self.settings.instances_dir),
                                         poll_s=self.xnat.poll_s)
        await self.poller.run(bus, stop)


def xnat_services(settings: Settings, xnat: XnatSettings | None = None) -> list[Service]:
    """The XNAT services for `lastmile up`: none unless LASTMILE_XNAT_URL is set."""
    xnat = xnat or XnatSettings.from_env()
    if not xnat.enabled:
        return []
    return [XnatPublisherService(settings, xnat), XnatFeedbackService(settings, xnat)]
