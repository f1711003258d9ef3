"""Wiring shared by the commands: reaching the bus, the embedded server, the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from events.jetstream import EventBus
from events.nats_auth import authorization_block
from events.nats_server import EmbeddedNats
from events.store_lock import StoreLock
from lastmile.settings import ConfigError, Settings

log = logging.getLogger("lastmile")


STATE_UMASK = 0o077


def secure_state_dir(settings: Settings) -> int:
    """Make the state dir owner-only before anything is written into it.

    Sets the process umask to 0o077 (so every file and folder made from now on, by us
    or by a child such as nats-server or Streamlit, is owner-only: instances, SEG/SR
    results, DuckDB, exports, logs). A state dir that group or others can reach (an
    older installation, a hand-made folder) is fixed, with everything under it, and a
    warning says so. Returns how many paths were fixed. Raises ``ConfigError`` when the
    folder belongs to another user (we cannot make it ours).
    """
    os.umask(STATE_UMASK)
    root = settings.state_dir
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = root.stat()
    if st.st_uid != os.geteuid():
        raise ConfigError(f"state dir {root} belongs to uid {st.st_uid}, not to this user "
                          f"(uid {os.geteuid()}): run Lastmile as its owner")
    if not st.st_mode & 0o077:
        return 0  # nobody else can reach anything below it
    fixed = 0
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                path.chmod(stat.S_IMODE(mode) & 0o700)
                fixed += 1
    log.warning("state dir %s was readable by group or others: made %d files and folders "
                "owner-only (it holds patient images and results)", root, fixed)
    return fixed


def read_model_lock(settings: Settings) -> StoreLock:
    """The one-writer lock of the DuckDB read model (the projector, `projections rebuild`)."""
    path = settings.duckdb_path
    return StoreLock(path.with_name(path.name + ".writer.lock"), f"the read model {path}")


def embedded_server(settings: Settings) -> EmbeddedNats:
    """The site's embedded nats-server: it always requires credentials, one user per
    service role (``events.nats_auth``), generated into the state dir at first start."""
    secure_state_dir(settings)
    creds = settings.nats_credentials()
    assert creds is not None  # always, for the embedded server
    return EmbeddedNats(
        store_dir=settings.state_dir / "nats",
        host=settings.nats_host,
        port=settings.nats_port,
        sync=settings.nats_sync,
        authorization=authorization_block(creds, settings.bus().stream),
        tls_cert=settings.nats_server_tls_cert,
        tls_key=settings.nats_server_tls_key,
    )


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@contextlib.asynccontextmanager
async def open_bus(settings: Settings, role: str = "admin") -> AsyncIterator[EventBus]:
    """A connected bus, as NATS user ``role`` (the CLI is admin). In embedded mode with no
    server running (no `lastmile up`), the embedded server is started on the state dir
    for the duration, so `audit` and `replay` work on a stopped installation too."""
    server: EmbeddedNats | None = None
    if settings.embedded_nats and not _listening(settings.nats_host, settings.nats_port):
        server = embedded_server(settings).start()
    try:
        bus = await EventBus.connect(settings.bus(role), ensure_stream=role == "admin")
        try:
            yield bus
        finally:
            await bus.close()
    finally:
        if server is not None:
            server.stop()


class Service:
    """A long-running part of `lastmile up` (SCP, worker, projector, ...)."""

    name: str = "service"
    #: the NATS user it runs as (``events.nats_auth.ROLES``); ``services_for`` sets it
    nats_role: str = "admin"

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        raise NotImplementedError


@dataclass
class Supervisor:
    """Runs services until a signal, restarting a crashed one with backoff.

    This is the one place that catches every exception: a crashing service must
    not take the others down, and its error must be visible.
    """

    settings: Settings
    services: Sequence[Service]
    on_ready: Callable[[EventBus], Awaitable[None]] | None = None
    max_restart_delay_s: float = 30.0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        secure_state_dir(self.settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        async with open_bus(self.settings) as bus, contextlib.AsyncExitStack() as buses:
            # one connection per role: each service acts as its own NATS user
            by_role: dict[str, EventBus] = {"admin": bus}
            for role in sorted({s.nats_role for s in self.services} - {"admin"}):
                role_settings = self.settings.bus(role)
                if role_settings.user == bus.settings.user and \
                        role_settings.creds_file == bus.settings.creds_file:
                    by_role[role] = bus  # an external server with one user for all
                    continue
                by_role[role] = await buses.enter_async_context(
                    await EventBus.connect(role_settings, ensure_stream=False))
            if self.on_ready is not None:
                # before the services start: a service's first seconds may hold the event
                # loop (importing the engine's libraries), and a request waiting then
                # times out (seen on a loaded machine: `up` and `demo` exited at start)
                await self.on_ready(bus)
            tasks = [asyncio.create_task(self._keep(s, by_role[s.nats_role], stop),
                                         name=s.name) for s in self.services]
            await stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self, service: Service, bus: EventBus, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                await service.run(bus, stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - supervisor top loop
                log.exception("service %s crashed; restarting in %.1fs", service.name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_restart_delay_s)


def state_path(settings: Settings, *parts: str) -> Path:
    path = settings.state_dir.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
