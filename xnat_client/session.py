"""One client session to XNAT through the ``xnat`` package, for what reads from XNAT
(``ingest.xnat_feedback``) and what publishes to it (``engine.xnat_publisher``).

Blocking (the client uses ``requests``): call it in a thread. The session is opened on
first use, every request is bounded by ``XnatAccess.timeout_s``, and any error drops the
session so the next call logs in afresh. Client errors are turned into the caller's own
error type by its ``describe``, so each side says what went wrong in its own terms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests

T = TypeVar("T")


@dataclass(frozen=True)
class XnatAccess:
    """Where and as whom. ``password`` is never shown (repr) or logged; ``user`` and
    ``password`` unset make the client read ``.netrc`` (``netrc_file``)."""

    url: str
    project: str = "LASTMILE"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    netrc_file: str | None = None
    verify: bool = True
    timeout_s: float = 30.0

    @property
    def destination(self) -> str:
        return f"xnat:{self.url.rstrip('/')}"


def client_logger() -> logging.Logger:
    """The client logs request URLs (with form and field values) at its verbose level:
    keep it at warnings, so a clinician's free text never reaches our logs."""
    client_log = logging.getLogger("lastmile.xnat.client")
    client_log.setLevel(logging.WARNING)
    return client_log


class XnatSession:
    def __init__(self, access: XnatAccess,
                 describe: Callable[[BaseException], Exception]) -> None:
        self.access = access
        self.describe = describe
        self._session: Any = None
        self.connects = 0

    def session(self) -> Any:
        if self._session is None:
            import xnat

            a = self.access
            self._session = xnat.connect(
                a.url, user=a.user, password=a.password, netrc_file=a.netrc_file,
                verify=a.verify, logger=client_logger(), default_timeout=a.timeout_s,
                pilot_timeout=a.timeout_s)
            self.connects += 1
        return self._session

    def close(self) -> None:
        """Drop the session (after an error: the next call logs in again)."""
        session, self._session = self._session, None
        if session is not None:
            try:
                session.disconnect()
            except (requests.RequestException, OSError):
                pass

    def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(session)``. Any error drops the session; a client error is raised as
        ``describe(error)``, anything else as it was."""
        import xnat.exceptions as xe

        try:
            return fn(self.session())
        except (xe.XNATError, requests.RequestException, OSError, ValueError,
                LookupError) as exc:
            self.close()
            raise self.describe(exc) from None
        except Exception:
            self.close()
            raise
