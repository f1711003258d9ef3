"""Settings: one validated object, from a TOML file and ``LASTMILE_*`` variables.

Precedence (highest first): command-line flags, environment (``LASTMILE_NATS_URL``
...), the TOML file (``--config`` or ``LASTMILE_CONFIG``, else ``./lastmile.toml``
if present), defaults. A bad file is refused with its line and key.
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.errors import ConfigError
from events.nats_auth import CREDENTIALS_FILE, CredentialsError, NatsCredentials, load_or_create

if TYPE_CHECKING:  # the NATS client loads with the first bus, not with the settings
    from events.jetstream import BusSettings

SECRET_FILE = "site_secret"

__all__ = ["ConfigError", "Settings", "load_settings"]


class Settings(BaseSettings):
    """Everything a Lastmile process needs to know about its site."""

    model_config = SettingsConfigDict(
        env_prefix="LASTMILE_", extra="forbid", validate_default=True, frozen=True
    )

    state_dir: Path = Field(Path(".lastmile"), description="Events, instances, databases")
    site_secret: SecretStr | None = Field(
        None, description="HMAC key for patient pseudonyms; generated into state_dir if unset"
    )
    # --- NATS
    nats_url: str | None = Field(
        None, description="Use this NATS (comma-separated for a cluster); unset = embedded"
    )
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_creds: Path | None = None
    nats_credentials_file: Path | None = Field(
        None, description="One NATS user per service role (JSON, owner-only); embedded: "
        "generated at first start as state_dir/nats-credentials.json")
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    nats_server_tls_cert: Path | None = Field(
        None, description="Embedded server's certificate (PEM): clients must use TLS")
    nats_server_tls_key: Path | None = None
    nats_host: str = "127.0.0.1"
    nats_port: int = Field(4222, ge=1, le=65535)
    nats_sync: str = Field(
        "always", description='Embedded server fsync: "always" or an interval such as "2m"'
    )
    stream_replicas: int = Field(1, ge=1, le=5, description="1 embedded, 3 on a cluster")
    stream_duplicate_window_s: float = Field(120.0, gt=0)
    stream_max_age_days: float = Field(0.0, ge=0, description="0 keeps events forever")
    stream_max_bytes: int = Field(-1, description="-1 = unlimited; when full, writes fail")
    publish_retry_s: float = Field(30.0, gt=0)
    # --- DICOM ingest
    dicom_host: str = "127.0.0.1"
    dicom_port: int = Field(11112, ge=1, le=65535)
    dicom_general_ae: str = Field("LASTMILE", description="AE title that applies routing rules")
    dicom_max_pdu: int = Field(
        1 << 20, ge=0, description="Maximum PDU we receive (bytes); 0 = unlimited declared, "
        "still bounded at 64 MiB per PDU")
    dicom_max_associations: int = Field(10, ge=1)
    # --- receiver hardening (issues 14 and 18)
    dicom_request_timeout_s: float = Field(
        5.0, gt=0, le=120, description="A connection that has not sent an association "
        "request (and finished its TLS handshake) by then is closed")
    dicom_max_pending: int = Field(
        64, ge=1, description="Connections at once that have not sent an association request")
    dicom_max_connections_per_address: int = Field(
        8, ge=1, description="Connections at once from one source address")
    dicom_receive_to_disk: bool = Field(
        True, description="Receive data sets to disk in chunks (memory per association ~ one "
        "PDU); false keeps each in memory (faster, ~2x the instance size per association)")
    dicom_tls_cert: Path | None = Field(
        None, description="Receiver's TLS certificate (PEM): DICOM TLS, PS3.15 B.1")
    dicom_tls_key: Path | None = None
    dicom_tls_ca: Path | None = Field(
        None, description="With TLS: peers must present a certificate signed by this CA")
    dicom_max_instance_mb: int = Field(2048, ge=1, description="Larger datasets are refused")
    dicom_min_free_mb: int = Field(1024, ge=0, description="Refuse new data below this")
    dicom_publish_timeout_s: float = Field(
        10.0, gt=0, le=300,
        description="How long a sender waits while the event log is unreachable before it "
                    "gets a failure status (and resends)")
    dicom_allowed_calling_aes: tuple[str, ...] = Field((), description="Empty = any")
    dicom_allowed_addresses: tuple[str, ...] = Field((), description="Empty = any")
    routing_rules: Path | None = Field(None, description="Routing rules YAML")
    # --- engine
    pipelines_dir: Path = Field(Path("pipelines"), description="Pipeline YAML files")
    worker_id: str | None = Field(None, description="Defaults to host:pid")
    # --- priors from the PACS (longitudinal pipelines; engine.pacs_priors)
    priors_pacs: str | None = Field(
        None, description="AE@host:port of the PACS asked (C-FIND, C-MOVE) for a patient's "
        "earlier studies when the log holds no earlier result; unset: never asked")
    priors_move_destination: str | None = Field(
        None, min_length=1, max_length=16,
        description="AE title the PACS sends priors to (it must map it to this receiver); "
        "unset: the pipeline's own AE title")
    priors_retries: int = Field(2, ge=0, le=10, description="Retries per PACS request")
    priors_timeout_s: float = Field(30.0, gt=0, description="Per PACS request")
    # --- which services `lastmile up` runs on this host
    services: tuple[Literal["ingest", "engine", "projector", "dashboard", "xnat"], ...] = Field(
        ("ingest", "engine", "projector", "dashboard", "xnat"),
        description="Scale out: extra worker hosts run only 'engine'; run 'ingest' (receiver "
        "and study-completion detector) on one host",
    )
    # --- pages
    dashboard_port: int = Field(8501, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def instances_dir(self) -> Path:
        """The content-addressed DICOM store; ``store_key`` in events is relative to it."""
        return self.state_dir / "instances"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    @property
    def duckdb_path(self) -> Path:
        return self.state_dir / "lastmile.duckdb"

    @field_validator("priors_pacs")
    @classmethod
    def _priors_pacs(cls, v: str | None) -> str | None:
        ae, _, rest = (v or "").partition("@")
        host, _, port = rest.rpartition(":")
        if v is not None and not (0 < len(ae) <= 16 and host and port.isdigit()
                                  and 0 < int(port) < 65536):
            raise ValueError("expected AE@host:port (an AE title of at most 16 characters)")
        return v

    @field_validator("nats_sync")
    @classmethod
    def _sync(cls, v: str) -> str:
        if v != "always" and not re.fullmatch(r"\d+(ms|s|m|h)", v):
            raise ValueError('must be "always" or a duration such as "1s", "2m"')
        return v

    @property
    def embedded_nats(self) -> bool:
        return not self.nats_url

    def nats_servers(self) -> tuple[str, ...]:
        if self.nats_url:
            return tuple(u.strip() for u in self.nats_url.split(",") if u.strip())
        return (f"nats://{self.nats_host}:{self.nats_port}",)

    @property
    def credentials_path(self) -> Path | None:
        """The per-role NATS credentials file: always one for the embedded server."""
        if self.nats_credentials_file is not None:
            return self.nats_credentials_file
        return self.state_dir / CREDENTIALS_FILE if self.embedded_nats else None

    def nats_credentials(self) -> NatsCredentials | None:
        """Per-role NATS users (generated for the embedded server at first use), or None
        for an external server configured with one user (``nats_user``/``nats_creds``)."""
        path = self.credentials_path
        if path is None:
            return None
        try:
            if self.embedded_nats:
                return load_or_create(path)
            if not path.exists():
                raise ConfigError(f"nats_credentials_file {path} does not exist")
            return NatsCredentials.read(path)
        except CredentialsError as exc:
            raise ConfigError(str(exc)) from None

    def bus(self, role: str = "admin") -> BusSettings:
        """How a service of ``role`` (``events.nats_auth.ROLES``) reaches the log: with
        that role's NATS user where per-role credentials exist (always, embedded)."""
        from events.jetstream import BusSettings

        def s(p: Path | None) -> str | None:
            return str(p) if p else None

        user = self.nats_user
        password = self.nats_password.get_secret_value() if self.nats_password else None
        creds = self.nats_credentials()
        if creds is not None:
            try:
                u = creds.for_role(role)
            except CredentialsError as exc:
                raise ConfigError(f"{self.credentials_path}: {exc}") from None
            user, password = u.user, u.password
        return BusSettings(
            servers=self.nats_servers(),
            user=user,
            password=password,
            creds_file=None if creds is not None else s(self.nats_creds),
            tls_ca=s(self.nats_tls_ca),
            tls_cert=s(self.nats_tls_cert),
            tls_key=s(self.nats_tls_key),
            replicas=self.stream_replicas,
            duplicate_window_s=self.stream_duplicate_window_s,
            max_age_s=self.stream_max_age_days * 86400.0,
            max_bytes=self.stream_max_bytes,
            publish_retry_s=self.publish_retry_s,
            name=f"lastmile-{role}",
        )

    def secret(self) -> bytes:
        """The site secret: from the environment/config, else the 0600 file in state_dir,
        generated on first use. Refuses a secret file others can read."""
        if self.site_secret is not None:
            return self.site_secret.get_secret_value().encode("utf-8")
        path = self.state_dir / SECRET_FILE
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(
                    f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`"
                )
            return path.read_bytes().strip()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode("ascii"))
        return path.read_bytes().strip()


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^[ \t]*{re.escape(key)}[ \t]*=", re.MULTILINE)
    m = pattern.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from file + environment + overrides (flags), or raise ``ConfigError``."""
    env_config = os.environ.get("LASTMILE_CONFIG")
    path = config or (Path(env_config) if env_config else None)
    if path is None and Path("lastmile.toml").exists():
        path = Path("lastmile.toml")
    file_values: dict[str, Any] = {}
    text = ""
    if path is not None:
        try:
            text = path.read_text()
            file_values = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    env_keys = {
        k[len("LASTMILE_") :].lower()
        for k in os.environ
        if k.startswith("LASTMILE_") and k != "LASTMILE_CONFIG"
    }
    # environment beats file: drop file keys that the environment sets
    init = {k: v for k, v in file_values.items() if k not in env_keys}
    init.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**init)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "?"
            where = ""
            if path is not None and key in file_values and key not in overrides:
                line = _line_of(text, key)
                where = f"{path}:{line}: " if line else f"{path}: "
            elif key.upper() in {k[len("LASTMILE_") :] for k in os.environ}:
                where = f"environment LASTMILE_{key.upper()}: "
            msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}{key}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
