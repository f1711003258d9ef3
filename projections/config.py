"""The projections' settings, from ``LASTMILE_*`` environment variables: read by the
projector service and by the governance pages, so it lives with the read models."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from events.errors import ConfigError
from projections.report import DEFAULT_POSITIVE


def _positive(text: str) -> dict[str, str]:
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    result = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"LASTMILE_POSITIVE_CLASSES: {pair!r} is not pipeline=class "
                              "(e.g. hfd=fracture,bts=progression)")
        result[name.strip()] = value.strip()
    return result


@dataclass(frozen=True)
class ProjectionsConfig:
    """This part's settings, from ``LASTMILE_*`` variables (all optional)."""

    batch_size: int = 5000  # LASTMILE_PROJECTOR_BATCH
    idle_s: float = 0.2  # LASTMILE_PROJECTOR_IDLE_S: wait when the log has nothing new
    drift_threshold: float = 0.2  # LASTMILE_DRIFT_THRESHOLD (PSI)
    drift_baseline_weeks: int = 4  # LASTMILE_DRIFT_BASELINE_WEEKS
    drift_every_s: float = 3600.0  # LASTMILE_DRIFT_EVERY_S; 0 = never check
    unblinding_key: Path | None = None  # LASTMILE_UNBLINDING_KEY: JSON/TOML label -> source
    positive: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_POSITIVE))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProjectionsConfig:
        env = os.environ if environ is None else environ

        def get(name: str, conv: Any, default: Any) -> Any:
            raw = env.get(f"LASTMILE_{name}")
            if raw is None or raw == "":
                return default
            try:
                return conv(raw)
            except ValueError:
                raise ConfigError(f"environment LASTMILE_{name}: {raw!r} is not a valid "
                                  f"{conv.__name__}") from None

        return cls(
            batch_size=get("PROJECTOR_BATCH", int, 5000),
            idle_s=get("PROJECTOR_IDLE_S", float, 0.2),
            drift_threshold=get("DRIFT_THRESHOLD", float, 0.2),
            drift_baseline_weeks=get("DRIFT_BASELINE_WEEKS", int, 4),
            drift_every_s=get("DRIFT_EVERY_S", float, 3600.0),
            unblinding_key=get("UNBLINDING_KEY", Path, None),
            positive=get("POSITIVE_CLASSES", _positive, dict(DEFAULT_POSITIVE)),
        )

    def unblinding(self) -> dict[str, str]:
        """The blinding key (blinded label -> source); kept out of the log on purpose."""
        if self.unblinding_key is None:
            return {}
        path = self.unblinding_key
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"unblinding key {path} does not exist") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"unblinding key {path}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"unblinding key {path} must map blinded labels to sources")
        return {str(k): v for k, v in data.items()}
