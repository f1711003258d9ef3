"""Where the dashboard reads from: the read model's DuckDB file and the event log.

``lastmile up`` starts the Streamlit process with ``LASTMILE_DASHBOARD_DUCKDB`` and
``LASTMILE_DASHBOARD_BUS`` (the bus settings as JSON, so a password never appears on a
command line) in its environment (``dashboards.process.dashboard_env``); without them
the pages say how to start them.
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
        if not db:
            raise DashboardConfigError(f"{ENV_DUCKDB} is not set: start the pages with "
                                       "`lastmile dashboard` or `lastmile up`")
        return cls(Path(db), bus)


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


# --------------------------------------------------------------------------- review pages

ENV_STATE_DIR = "LASTMILE_DASHBOARD_STATE_DIR"
ENV_USERS = "LASTMILE_USERS_FILE"
ENV_PROXY_HEADER = "LASTMILE_AUTH_PROXY_HEADER"
ENV_DEMO = "LASTMILE_DEMO"
ENV_BLINDED = "LASTMILE_BLINDED_STUDY"
ENV_QC_PIPELINES = "LASTMILE_QC_PIPELINES"
ENV_PUBLIC_URL = "LASTMILE_PUBLIC_URL"
# The pages' front (dashboards.front) and the Streamlit process behind it: the front puts
# the signed-in user's name in HEADER_USER and a secret made at each start in HEADER_FRONT;
# Streamlit believes HEADER_USER only next to that secret (given to both in ENV_FRONT_SECRET).
ENV_FRONT_SECRET = "LASTMILE_FRONT_SECRET"
HEADER_USER = "X-Lastmile-User"
HEADER_FRONT = "X-Lastmile-Front"
ENV_FRONT_UPSTREAM = "LASTMILE_FRONT_UPSTREAM"  # Streamlit's loopback URL, for the front
MAX_UPLOAD_MB = 128  # an upload (a corrected SEG), as sent and once inflated


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ReviewConfig:
    """What the review pages need beyond the read model and the bus.

    ``state_dir`` locates the instance store (``instances``) and the AI results
    (``results``); ``users_file`` the sign-in users; ``proxy_header`` (only when set)
    names a header a trusted reverse proxy fills with the signed-in user's name;
    ``demo`` lets an unconfigured demo be used without sign-in (as ``demo.viewer``);
    ``front_secret`` is what the pages' front proves itself with (None: nobody can).
    """

    state_dir: Path
    users_file: Path
    proxy_header: str | None = None
    demo: bool = False
    blinded_study: Path | None = None
    qc_pipelines: frozenset[str] = frozenset({"hfd"})
    xnat_url: str | None = None
    xnat_project: str = "LASTMILE"
    public_url: str | None = None
    front_secret: str | None = None

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReviewConfig:
        env = os.environ if environ is None else environ
        raw_state = env.get(ENV_STATE_DIR)
        # the setting's own default (lastmile.settings: LASTMILE_STATE_DIR, else .lastmile)
        state = Path(raw_state or env.get("LASTMILE_STATE_DIR") or ".lastmile")
        users = Path(env[ENV_USERS]) if env.get(ENV_USERS) else state / "users.toml"
        qc = frozenset(p.strip() for p in env.get(ENV_QC_PIPELINES, "hfd").split(",")
                       if p.strip())
        blinded = env.get(ENV_BLINDED)
        return cls(state_dir=state, users_file=users,
                   proxy_header=(env.get(ENV_PROXY_HEADER) or "").strip() or None,
                   demo=_truthy(env.get(ENV_DEMO)),
                   blinded_study=Path(blinded) if blinded else None, qc_pipelines=qc,
                   xnat_url=(env.get("LASTMILE_XNAT_URL") or "").strip().rstrip("/") or None,
                   xnat_project=(env.get("LASTMILE_XNAT_PROJECT") or "").strip() or "LASTMILE",
                   public_url=(env.get(ENV_PUBLIC_URL) or "").strip().rstrip("/") or None,
                   front_secret=env.get(ENV_FRONT_SECRET) or None)
