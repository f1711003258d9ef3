"""`lastmile security`: the NATS users of the site (one per service role).

- ``nats-config`` prints the ``authorization`` block (users and permissions) for an
  external nats-server's configuration, from the site's credentials file: a site running
  its own cluster pastes it there and points ``LASTMILE_NATS_CREDENTIALS_FILE`` at the
  same file on each Lastmile host (docs/operations.md, Security).
- ``rotate`` replaces every role's password in the credentials file. The embedded server
  reads them when it starts, so rotate with `lastmile up` stopped (refused otherwise:
  the JetStream store's lock is held); an external server needs the new ``nats-config``
  loaded (``nats-server --signal reload``).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lastmile.cli_common import out, settings_of
from lastmile.settings import ConfigError, Settings

security_app = typer.Typer(help="NATS users per service role: print their server "
                           "configuration, rotate their passwords.", no_args_is_help=True)


def _path(settings: Settings) -> Path:
    path = settings.credentials_path
    if path is None:
        raise ConfigError("an external NATS with one user: set nats_credentials_file "
                          "(LASTMILE_NATS_CREDENTIALS_FILE) to use one user per role")
    return path


@security_app.command("nats-config")
def nats_config_command(ctx: typer.Context) -> None:
    """Print the nats-server `authorization` block for the site's per-role users."""
    from events.nats_auth import authorization_block, load_or_create

    settings = settings_of(ctx)
    path = _path(settings)
    # a site making its first file for an external server gets one generated
    creds = settings.nats_credentials() if path.exists() else load_or_create(path)
    assert creds is not None
    print(authorization_block(creds, settings.bus().stream))


@security_app.command("rotate")
def rotate_command(ctx: typer.Context) -> None:
    """New passwords for every role (stop `lastmile up` first; restart it after)."""
    from events.nats_auth import NatsCredentials
    from events.store_lock import StoreLock

    settings = settings_of(ctx)
    path = _path(settings)
    store = settings.state_dir / "nats"
    with StoreLock(store / "store.lock", f"the JetStream store {store}"):
        fresh = path.with_name(path.name + ".new")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(NatsCredentials.generate().to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(fresh, path)
    out.print(f"new NATS passwords for every role in {path}; "
              + ("`lastmile up` uses them at its next start" if settings.embedded_nats else
                 "load `lastmile security nats-config` into the servers and reload them"))
