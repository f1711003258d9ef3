"""Where the dashboard reads from: the read model's DuckDB file and the event log.

``lastmile up`` starts the Streamlit process with ``LASTMILE_DASHBOARD_DUCKDB`` and
``LASTMILE_DASHBOARD_BUS`` (the bus settings as JSON, so a password never appears on a
command line) in its environment; run by hand, the dashboard falls back to the site's
settings (``lastmile.settings.load_settings``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from events.jetstream import BusSettings

ENV_DUCKDB = "LASTMILE_DASHBOARD_DUCKDB"
ENV_BUS = "LASTMILE_DASHBOARD_BUS"


class DashboardConfigError(Exception):
    """The dashboard cannot tell where its data is."""


@dataclass(frozen=True)
class DashboardConfig:
    duckdb_path: Path
    bus: BusSettings | None  # None: pages that need the event log say so

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DashboardConfig:
        env = os.environ if environ is None else environ
        db = env.get(ENV_DUCKDB)
        raw_bus = env.get(ENV_BUS)
        bus = bus_from_json(raw_bus) if raw_bus else None
        if db and raw_bus:
            return cls(Path(db), bus)
        from lastmile.settings import load_settings

        settings = load_settings()
        return cls(Path(db) if db else settings.duckdb_path, bus or settings.bus())


def bus_to_json(bus: BusSettings) -> str:
    data = asdict(bus)
    data["servers"] = list(bus.servers)
    return json.dumps(data)


def bus_from_json(text: str) -> BusSettings:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DashboardConfigError(f"{ENV_BUS} is not JSON: {exc}") from None
    known = {f.name for f in fields(BusSettings)}
    if not isinstance(data, dict) or set(data) - known:
        raise DashboardConfigError(f"{ENV_BUS} must be an object with keys from {sorted(known)}")
    data["servers"] = tuple(data.get("servers") or ())
    return BusSettings(**data)
