"""The pages' authenticating front: one small ASGI app (Starlette, served by uvicorn) in
front of the Streamlit pages.

    browser ──HTTPS/HTTP + WebSocket──▶ front (dashboard_port) ──▶ Streamlit (127.0.0.1,
                                                                   internal port)

What it does, and what it is for (issue 18, the pages):

- **Sign-in and server-side sessions** (``/_lm/signin``, ``/_lm/signout``,
  ``/_lm/password``): a random session token in a cookie that is HttpOnly,
  ``SameSite=Strict``, ``Secure`` behind TLS, path ``/``; the server keeps the session
  (``dashboards.review.sessions``), so sign-out, a password change, ``lastmile users
  remove/disable`` and an idle timeout end it: a copied cookie stops working at once.
  Open page connections (WebSockets) of an ended session are closed.
- **Password-guessing limits** per user name and per client address
  (``SigninLimiter``), kept in this process (a reload or a new browser does not reset
  them), each failure and each lock recorded as an event (``review.signin.failed``).
- **Identity to Streamlit**: every proxied request carries ``X-Lastmile-User`` (the
  signed-in user) and ``X-Lastmile-Front`` (a secret made at each start and given only to
  this process and Streamlit). Both headers are removed from what the client sent, and so
  is the site's trusted proxy header (``LASTMILE_AUTH_PROXY_HEADER``), which this front
  honours instead of Streamlit.
- **Patient data only to the signed-in**: every proxied path needs a session;
  ``/media/...`` (Streamlit's downloads: reports, event histories, CSVs, all made by the
  governance pages) needs the governance role; case images never go through ``/media``
  (the pages send them inside the authenticated page connection).
- **Uploads** only with a session, bounded (``max_upload_mb``) with a clear message.
- **Security headers** on every answer: CSP (``frame-ancestors 'none'``, no external
  images or scripts), ``X-Frame-Options: DENY``, ``nosniff``, ``Referrer-Policy:
  no-referrer`` (deep links carry study UIDs), HSTS behind TLS, ``Cache-Control: no-store``.

More services (the DICOMweb service of issue [8 of 9]) sit behind the same front: build
the app with ``create_app(config, extra_routes=[Mount("/dicomweb", app=...)])``; a mounted
app sees the signed-in user in ``request.state.user`` when wrapped with ``requires_user``.

Run: ``python -m dashboards.front --port 8501`` with the settings in the environment
(``FrontConfig.from_env``); ``lastmile up`` and ``lastmile dashboard`` do it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import html
import logging
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from dashboards.config import (
    ENV_BUS,
    ENV_FRONT_SECRET,
    ENV_FRONT_UPSTREAM,
    HEADER_FRONT,
    HEADER_USER,
    MAX_UPLOAD_MB,
    ReviewConfig,
    bus_from_json,
)
from dashboards.review.auth import (
    AuthError,
    Role,
    User,
    Users,
    authenticate,
    check_strength,
    hash_password,
    load_users,
    save_users,
    with_user,
)
from dashboards.review.sessions import (
    Limited,
    Session,
    SessionStore,
    SigninLimiter,
    still_valid,
)
from events.base import Event
from events.catalogue import (
    PasswordChanged,
    SessionEnd,
    SessionEnded,
    SigninFailed,
    SigninFailure,
    SigninSucceeded,
)
from events.jetstream import BusSettings, EventBus

log = logging.getLogger("lastmile.front")

COOKIE = "lm_session"
DEMO_USER = "demo.viewer"
ENV_UPSTREAM = ENV_FRONT_UPSTREAM
ENV_IDLE = "LASTMILE_SESSION_IDLE_S"
ENV_USER_LIMIT = "LASTMILE_SIGNIN_USER_LIMIT"
ENV_ADDRESS_LIMIT = "LASTMILE_SIGNIN_ADDRESS_LIMIT"
ENV_WINDOW = "LASTMILE_SIGNIN_WINDOW_S"
ENV_SECURE = "LASTMILE_SECURE_COOKIES"
MAX_FORM_BYTES = 16 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailers", "transfer-encoding", "upgrade", "host"})
# 'unsafe-eval': Vega (the charts) compiles its expressions with Function(); inline
# scripts run only by hash (``csp_for``); inline styles are how Streamlit styles itself.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
       "media-src 'self' data: blob:; worker-src 'self' blob:; frame-src 'self'; "
       "frame-ancestors 'none'; object-src 'none'; base-uri 'self'; form-action 'self'")
SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FrontConfig:
    """The front's settings. ``upstream``: Streamlit's loopback URL; ``secret``: the
    per-start secret Streamlit checks; ``secure_cookies``: None = only when the request
    arrived over HTTPS (TLS here, or a trusted proxy's ``X-Forwarded-Proto``)."""

    upstream: str
    secret: str
    review: ReviewConfig
    bus: BusSettings | None = None
    idle_s: float = 900.0
    absolute_s: float = 12 * 3600.0
    user_limit: int = 10
    address_limit: int = 30
    window_s: float = 900.0
    max_upload_mb: int = MAX_UPLOAD_MB
    secure_cookies: bool | None = None
    event_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FrontConfig:
        env = os.environ if environ is None else environ
        upstream = env.get(ENV_UPSTREAM)
        secret = env.get(ENV_FRONT_SECRET)
        if not upstream or not secret:
            raise SystemExit(f"{ENV_UPSTREAM} and {ENV_FRONT_SECRET} must be set "
                             "(`lastmile up` and `lastmile dashboard` set them)")
        secure = (env.get(ENV_SECURE) or "auto").strip().lower()

        def num(name: str, default: float) -> float:
            raw = env.get(name)
            try:
                return float(raw) if raw else default
            except ValueError:
                raise SystemExit(f"{name}={raw!r} is not a number") from None

        return cls(upstream.rstrip("/"), secret, ReviewConfig.from_env(env),
                   bus_from_json(env[ENV_BUS]) if env.get(ENV_BUS) else None,
                   idle_s=num(ENV_IDLE, 900.0), user_limit=int(num(ENV_USER_LIMIT, 10)),
                   address_limit=int(num(ENV_ADDRESS_LIMIT, 30)),
                   window_s=num(ENV_WINDOW, 900.0),
                   secure_cookies=None if secure == "auto" else secure in ("1", "true", "yes"))


# --------------------------------------------------------------------------- state


@dataclass
class Identity:
    """Who a request is from, and how the front knows."""

    user: User
    method: str  # "password", "proxy" or "demo"
    session: Session | None = None
    token: str | None = None


@dataclass
class FrontState:
    config: FrontConfig
    sessions: SessionStore
    limiter: SigninLimiter
    client: httpx.AsyncClient | None = None
    bus: EventBus | None = None
    sockets: dict[str, set[asyncio.Task[Any]]] = field(default_factory=dict)
    _users: tuple[float, Users] | None = None

    def users(self) -> Users:
        """The users file, re-read when its modification time changes."""
        path = self.config.review.users_file
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return Users()
        if self._users is None or self._users[0] != mtime:
            self._users = (mtime, load_users(path))
        return self._users[1]

    async def record(self, event: Event) -> None:
        """Publish a sign-in fact; a log that does not answer costs a warning, never the
        sign-in itself."""
        if self.bus is None:
            log.warning("no event log configured: %s not recorded", event.type_name())
            return
        try:
            await asyncio.wait_for(self.bus.publish(event), self.config.event_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any bus failure: keep serving, say so
            log.warning("%s not recorded: %s", event.type_name(), type(exc).__name__)

    def end_sockets(self, token: str | None) -> None:
        """Close the page connections opened with this session."""
        for task in self.sockets.pop(token or "", set()):
            task.cancel()


def _state(conn: HTTPConnection) -> FrontState:
    state: FrontState = conn.app.state.front
    return state


def _address(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else "unknown"


def _secure(conn: HTTPConnection, cfg: FrontConfig) -> bool:
    if cfg.secure_cookies is not None:
        return cfg.secure_cookies
    return conn.url.scheme in ("https", "wss")


def identify(conn: HTTPConnection, *, touch: bool = True) -> Identity | None:
    """The user of this request: the site's trusted proxy header (when configured), the
    session cookie, or the demo viewer (demo mode while no users exist). ``touch``: the
    request counts as activity (resets the idle clock). Raises ``AuthError`` when the
    users file cannot be used or the proxy names a non-user."""
    st = _state(conn)
    cfg = st.config.review
    users = st.users()
    if cfg.proxy_header:
        name = (conn.headers.get(cfg.proxy_header) or "").strip()
        if name:
            user = users.get(name)
            if user is None or user.disabled:
                raise AuthError(f"{name} (from the sign-in proxy) is not a Lastmile user; ask "
                                "an admin to run `lastmile users add`")
            return Identity(user, "proxy")
    token = conn.cookies.get(COOKIE)
    session = st.sessions.get(token, touch=touch)
    if session is not None:
        user = users.get(session.user)
        if still_valid(session, user):
            assert user is not None
            return Identity(user, "password", session, token)
        st.sessions.end(token)
        st.end_sockets(token)
    if cfg.demo and len(users) == 0:
        return Identity(User(DEMO_USER, frozenset({Role.READER, Role.QC, Role.GOVERNANCE})),
                        "demo")
    return None


# --------------------------------------------------------------------------- pages


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>"
           f"{html.escape(title)} · Lastmile</title><meta name=viewport "
           "content='width=device-width, initial-scale=1'><link rel=stylesheet "
           "href='/_lm/style.css'></head><body><main>"
           f"<h1>{html.escape(title)}</h1>{body}</main></body></html>")
    return HTMLResponse(doc, status_code=status, headers={"cache-control": "no-store"})


STYLE = """body{font-family:system-ui,sans-serif;background:#f6f7f9;color:#1f2328;margin:0}
main{max-width:26rem;margin:4rem auto;background:#fff;padding:2rem 2.5rem;border-radius:8px;
box-shadow:0 1px 4px #0002}label{display:block;margin:1rem 0 .3rem;font-weight:600}
input{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem}
button{margin-top:1.4rem;padding:.55rem 1.2rem;font-size:1rem;background:#ff4b4b;color:#fff;
border:0;border-radius:6px;cursor:pointer}.error{color:#b00020;font-weight:600}
.note{color:#555}"""


def _safe_next(value: str | None) -> str:
    """Only a path on this site (never //host or a scheme): where to go after sign-in."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value \
            or value.startswith("/_lm/"):
        return "/"
    return value


def _signin_page(next_path: str, message: str = "", note: str = "",
                 status: int = 200) -> HTMLResponse:
    err = f"<p class=error role=alert>{html.escape(message)}</p>" if message else ""
    info = f"<p class=note>{html.escape(note)}</p>" if note else ""
    return _page("Sign in to Lastmile", f"""{info}{err}
<form method=post action="/_lm/signin">
<input type=hidden name=next value="{html.escape(next_path)}">
<label for=name>User name</label><input id=name name=name autocomplete=username required
 autofocus maxlength=64>
<label for=password>Password</label><input id=password name=password type=password
 autocomplete=current-password required maxlength=1024>
<button type=submit>Sign in</button></form>
<p class=note>Reviews, QC decisions and edits are recorded under your name.</p>""", status)


async def _form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v for k, v in pairs}


def _same_origin(conn: HTTPConnection) -> bool:
    """A form post or page connection must come from a page of this site (the Origin
    header browsers send), so another site cannot sign someone out or in."""
    origin = conn.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None  # non-browser clients send none; "null" is an opaque origin
    host = conn.headers.get("host", "")
    return urllib.parse.urlsplit(origin).netloc == host


def _set_cookie(response: Response, conn: HTTPConnection, token: str) -> None:
    response.set_cookie(COOKIE, token, path="/", httponly=True, samesite="strict",
                        secure=_secure(conn, _state(conn).config))


def _clear_cookie(response: Response, conn: HTTPConnection) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=_secure(conn, _state(conn).config))


async def signin_get(request: Request) -> Response:
    st = _state(request)
    try:
        users = st.users()
    except AuthError as exc:
        return _page("Sign-in is unavailable", f"<p class=error>{html.escape(str(exc))}</p>",
                     503)
    note = ""
    if len(users) == 0:
        note = ("No users yet: create one with `lastmile users add NAME --role reader` "
                f"(users file: {st.config.review.users_file}).")
    if request.query_params.get("bye"):
        note = "You are signed out."
    return _signin_page(_safe_next(request.query_params.get("next")), note=note)


async def signin_post(request: Request) -> Response:
    st = _state(request)
    if not _same_origin(request):
        return PlainTextResponse("sign-in form from another site refused", 403)
    form = await _form(request)
    name = (form.get("name") or "").strip()[:64]
    password = form.get("password") or ""
    next_path = _safe_next(form.get("next"))
    address = _address(request)
    try:
        users = st.users()
    except AuthError as exc:
        return _page("Sign-in is unavailable", f"<p class=error>{html.escape(str(exc))}</p>",
                     503)
    known = users.get(name)
    limited = st.limiter.check(name, address)
    if limited is not None:
        return await _refuse_limited(request, st, limited, known, name, address, next_path)
    user = await asyncio.to_thread(authenticate, users, name, password)
    if user is None:
        per_user, per_address = st.limiter.failed(name, address)
        reason = SigninFailure.UNKNOWN_USER if known is None else \
            SigninFailure.DISABLED if known.disabled else SigninFailure.WRONG_PASSWORD
        await st.record(SigninFailed.new(actor=known.name if known else "anonymous",
                                         user=known.name if known else None,
                                         address=address, reason=reason, failures=per_user))
        log.info("failed sign-in from %s (%s; %d for this name, %d from this address)",
                 address, reason.value, per_user, per_address)
        return _signin_page(next_path, "Unknown user name or wrong password.", status=401)
    st.limiter.succeeded(name)
    token, _ = st.sessions.create(user, address)
    await st.record(SigninSucceeded.new(actor=user.name, user=user.name, address=address))
    response = RedirectResponse(next_path, status_code=303)
    _set_cookie(response, request, token)
    return response


async def _refuse_limited(request: Request, st: FrontState, limited: Limited,
                          known: User | None, name: str, address: str,
                          next_path: str) -> Response:
    """Refuse without checking the password; record the lock once per window (its first
    refusal), not every refused attempt."""
    reason = SigninFailure.USER_LIMITED if limited.scope == "user" else \
        SigninFailure.ADDRESS_LIMITED
    key = (limited.scope, name.lower() if limited.scope == "user" else address)
    noted: dict[tuple[str, str], float] = request.app.state.limits_noted
    now = time.monotonic()
    if noted.get(key, 0.0) < now:
        noted[key] = now + limited.retry_after_s
        await st.record(SigninFailed.new(actor=known.name if known else "anonymous",
                                         user=known.name if known else None, address=address,
                                         reason=reason, failures=limited.failures,
                                         retry_after_s=limited.retry_after_s))
        log.warning("sign-in limited (%s) from %s after %d failures, for %.0f s",
                    limited.scope, address, limited.failures, limited.retry_after_s)
    minutes = max(1, round(limited.retry_after_s / 60))
    what = "this user name" if limited.scope == "user" else "this address"
    response = _signin_page(next_path, f"Too many failed sign-ins for {what}: sign-in is "
                            f"refused for about {minutes} minute(s).", status=429)
    response.headers["retry-after"] = str(int(limited.retry_after_s) + 1)
    return response


def _need_session(request: Request) -> tuple[Identity | None, Response | None]:
    try:
        ident = identify(request)
    except AuthError as exc:
        return None, _page("Not signed in", f"<p class=error>{html.escape(str(exc))}</p>", 403)
    if ident is None or ident.session is None:
        return None, RedirectResponse("/_lm/signin", status_code=303)
    return ident, None


async def signout_get(request: Request) -> Response:
    ident, refused = _need_session(request)
    if refused is not None or ident is None or ident.session is None:
        return refused or RedirectResponse("/_lm/signin", status_code=303)
    return _page("Sign out", f"""<p>Signed in as {html.escape(ident.user.name)}.</p>
<form method=post action="/_lm/signout"><input type=hidden name=csrf
 value="{html.escape(ident.session.csrf)}"><button type=submit>Sign out</button></form>""")


async def signout_post(request: Request) -> Response:
    st = _state(request)
    ident, refused = _need_session(request)
    if refused is not None or ident is None or ident.session is None:
        return refused or RedirectResponse("/_lm/signin", status_code=303)
    form = await _form(request)
    if not _same_origin(request) or not ident.session.csrf_ok(form.get("csrf")):
        return PlainTextResponse("sign-out refused: not from a Lastmile page", 403)
    st.sessions.end(ident.token)
    st.end_sockets(ident.token)
    await st.record(SessionEnded.new(actor=ident.user.name, user=ident.user.name,
                                     address=_address(request), reason=SessionEnd.SIGNED_OUT))
    response = RedirectResponse("/_lm/signin?bye=1", status_code=303)
    _clear_cookie(response, request)
    return response


def _password_page(ident: Identity, message: str = "", ok: str = "",
                   status: int = 200) -> HTMLResponse:
    assert ident.session is not None
    err = f"<p class=error role=alert>{html.escape(message)}</p>" if message else ""
    done = f"<p role=status>{html.escape(ok)}</p>" if ok else ""
    return _page("Change password", f"""{done}{err}
<p>Signed in as {html.escape(ident.user.name)}. A new password ends your other sessions.</p>
<form method=post action="/_lm/password"><input type=hidden name=csrf
 value="{html.escape(ident.session.csrf)}">
<label for=current>Current password</label><input id=current name=current type=password
 autocomplete=current-password required maxlength=1024>
<label for=new>New password</label><input id=new name=new type=password
 autocomplete=new-password required maxlength=1024>
<label for=repeat>New password again</label><input id=repeat name=repeat type=password
 autocomplete=new-password required maxlength=1024>
<button type=submit>Change password</button></form><p><a href="/">Back to the pages</a></p>""",
                 status)


async def password_get(request: Request) -> Response:
    ident, refused = _need_session(request)
    if refused is not None or ident is None:
        return refused or RedirectResponse("/_lm/signin", status_code=303)
    return _password_page(ident)


async def password_post(request: Request) -> Response:
    st = _state(request)
    ident, refused = _need_session(request)
    if refused is not None or ident is None or ident.session is None:
        return refused or RedirectResponse("/_lm/signin", status_code=303)
    form = await _form(request)
    if not _same_origin(request) or not ident.session.csrf_ok(form.get("csrf")):
        return PlainTextResponse("password change refused: not from a Lastmile page", 403)
    users = st.users()
    user = ident.user
    address = _address(request)
    ok = await asyncio.to_thread(authenticate, users, user.name, form.get("current") or "")
    if ok is None:
        st.limiter.failed(user.name, address)
        await st.record(SigninFailed.new(actor=user.name, user=user.name, address=address,
                                         reason=SigninFailure.WRONG_PASSWORD))
        return _password_page(ident, "The current password is wrong.", status=401)
    new = form.get("new") or ""
    if new != (form.get("repeat") or ""):
        return _password_page(ident, "The two new passwords differ.", status=400)
    try:
        check_strength(new, user.name)
    except AuthError as exc:
        return _password_page(ident, f"Not changed: {exc}.", status=400)
    changed = User(user.name, user.roles, user.pipelines, hash_password(new), user.disabled)
    save_users(st.config.review.users_file, with_user(users, changed))
    ended = st.sessions.end_user(user.name)
    for token in [t for t in st.sockets if st.sessions.get(t, touch=False) is None]:
        st.end_sockets(token)
    await st.record(PasswordChanged.new(actor=user.name, user=user.name, address=address))
    await st.record(SessionEnded.new(actor=user.name, user=user.name, address=address,
                                     reason=SessionEnd.PASSWORD_CHANGED, sessions=ended))
    token, _ = st.sessions.create(changed, address)
    response = _password_page(Identity(changed, "password", st.sessions.get(token), token),
                              ok="Password changed; your other sessions are signed out.")
    _set_cookie(response, request, token)
    return response


async def style(request: Request) -> Response:
    return Response(STYLE, media_type="text/css")


async def health(request: Request) -> Response:
    st = _state(request)
    assert st.client is not None
    try:
        r = await st.client.get(f"{st.config.upstream}/_stcore/health", timeout=2.0)
        ok = r.status_code == 200
    except httpx.HTTPError:
        ok = False
    return PlainTextResponse("ok" if ok else "pages not answering", 200 if ok else 503)


async def stcore_health(request: Request) -> Response:
    """Streamlit's health check, open to anyone (it says "ok"): Streamlit also sets its
    XSRF cookie on it, so the answer's Set-Cookie is passed on."""
    st = _state(request)
    assert st.client is not None
    cookies = [c.strip() for c in request.headers.get("cookie", "").split(";")
               if c.strip() and c.split("=", 1)[0].strip() != COOKIE]
    try:
        r = await st.client.get(f"{st.config.upstream}/_stcore/health", timeout=5.0,
                                headers={"cookie": "; ".join(cookies)} if cookies else {})
    except httpx.HTTPError:
        return PlainTextResponse("pages not answering", 503)
    out = PlainTextResponse(r.text[:200], r.status_code)
    out.headers["cache-control"] = "no-cache"
    out.raw_headers += [(b"set-cookie", v.encode("latin-1"))
                        for v in r.headers.get_list("set-cookie")]
    return out


# --------------------------------------------------------------------------- proxy


def _upstream_headers(conn: HTTPConnection, ident: Identity, *, websocket: bool = False
                      ) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, identity headers it may have forged and
    our session cookie; plus the front's identity and secret."""
    st = _state(conn)
    drop = {HEADER_USER.lower(), HEADER_FRONT.lower(), "cookie", "origin", "content-length"}
    if st.config.review.proxy_header:
        drop.add(st.config.review.proxy_header.lower())
    if websocket:
        drop |= {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                 "sec-websocket-protocol"}
    out = [(k, v) for k, v in conn.headers.items() if k.lower() not in HOP_BY_HOP | drop]
    cookies = [c.strip() for c in conn.headers.get("cookie", "").split(";")  # as sent,
               if c.strip() and c.split("=", 1)[0].strip() != COOKIE]  # ours removed
    if cookies:
        out.append(("cookie", "; ".join(cookies)))
    if "origin" in conn.headers:  # checked against this site already; Streamlit sees its own
        out.append(("origin", st.config.upstream))
    out.append((HEADER_USER, ident.user.name))
    out.append((HEADER_FRONT, st.config.secret))
    return out


def _unauthenticated(conn: HTTPConnection) -> Response:
    accepts_html = "text/html" in conn.headers.get("accept", "")
    if conn.scope.get("method") == "GET" and accepts_html:
        target = conn.url.path + (f"?{conn.url.query}" if conn.url.query else "")
        return RedirectResponse("/_lm/signin?next=" + urllib.parse.quote(target, safe=""),
                                status_code=303)
    return PlainTextResponse("sign in first (/_lm/signin)", 401)


def requires_user(app: ASGIApp, role: Role | None = None) -> ASGIApp:
    """Wrap an ASGI app (a later service behind this front) so it sees only signed-in
    users with ``role``; the user is in ``scope["state"]["user"]``."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        try:
            ident = identify(conn)
        except AuthError as exc:
            await PlainTextResponse(str(exc), 403)(scope, receive, send)
            return
        if ident is None:
            await _unauthenticated(conn)(scope, receive, send)
            return
        if role is not None and not ident.user.has(role):
            await PlainTextResponse(f"needs the {role.value} role", 403)(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = ident.user
        await app(scope, receive, send)

    return wrapped


def _is_upload(path: str) -> bool:
    return path.startswith("/_stcore/upload_file")


async def proxy_http(request: Request) -> Response:
    st = _state(request)
    assert st.client is not None
    try:
        ident = identify(request)
    except AuthError as exc:
        return _page("Not signed in", f"<p class=error>{html.escape(str(exc))}</p>", 403)
    if ident is None:
        return _unauthenticated(request)
    path = request.url.path
    if path.startswith("/media/") and not ident.user.has(Role.GOVERNANCE):
        return PlainTextResponse("downloads are for the governance role", 403)
    limit = st.config.max_upload_mb * 1024 * 1024 + 64 * 1024  # plus the multipart framing
    declared = request.headers.get("content-length")
    too_big = PlainTextResponse(
        f"The file is larger than {st.config.max_upload_mb} MB, the limit for an upload.",
        413)
    if declared and declared.isdigit() and int(declared) > limit:
        return too_big
    if request.method in ("GET", "HEAD", "OPTIONS"):
        body: Any = b""
    elif _is_upload(path):
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return too_big
            chunks.append(chunk)
        body = b"".join(chunks)
    else:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES * 64:
            return too_big
    url = st.config.upstream + path + (f"?{request.url.query}" if request.url.query else "")
    upstream = st.client.build_request(request.method, url,
                                       headers=_upstream_headers(request, ident), content=body)
    try:
        resp = await st.client.send(upstream, stream=True)
    except httpx.HTTPError:
        return _page("The pages are not answering", "<p>Try again in a moment.</p>", 502)
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
               for k, v in resp.headers.multi_items()
               if k.lower() not in HOP_BY_HOP and k.lower() not in SECURITY_HEADERS]
    if resp.headers.get("content-type", "").startswith("text/html"):
        try:  # a page: allow exactly its own inline scripts (by hash), nothing else inline
            page = await resp.aread()
        finally:
            await resp.aclose()
        headers = [(k, v) for k, v in headers
                   if k not in (b"content-encoding", b"content-length")]
        headers.append((b"content-security-policy", csp_for(page).encode("latin-1")))
        out = Response(page, status_code=resp.status_code)
        out.raw_headers = [*headers, (b"content-length", str(len(page)).encode())]
        return out
    return _Streamed(resp.status_code, headers, resp.aiter_raw(), BackgroundTask(resp.aclose))


_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script>", re.S | re.I)


def csp_for(page: bytes) -> str:
    """The CSP for an HTML page from Streamlit: ``CSP`` with the SHA-256 of each of the
    page's own inline scripts added to ``script-src`` (CSP Level 2 hash sources), so no
    other inline script (an injected one) can run."""
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest())
                      .decode() + "'" for m in _INLINE_SCRIPT.finditer(page))
    return CSP.replace("script-src 'self'", f"script-src 'self' {hashes}".rstrip(), 1)


class _Streamed(Response):
    """The upstream's answer as it comes: its status, its headers (repeated ones such as
    Set-Cookie kept), its body streamed without decoding."""

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]],
                 body: AsyncIterator[bytes], background: BackgroundTask) -> None:
        self.status_code = status
        self.raw_headers = raw_headers
        self.background = background
        self._iter = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for chunk in self._iter:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self.background is not None:
                await self.background()


async def proxy_ws(websocket: WebSocket) -> None:
    """Streamlit's page connection (``/_stcore/stream``): opened only for a signed-in
    user from a page of this site; closed when the session ends or idles out."""
    import websockets

    st = _state(websocket)
    try:
        ident = identify(websocket)
    except AuthError:
        ident = None
    if ident is None or not _same_origin(websocket):
        await websocket.close(code=1008)
        return
    url = st.config.upstream.replace("http://", "ws://", 1) + websocket.url.path
    if websocket.url.query:
        url += f"?{websocket.url.query}"
    protocols = [websockets.Subprotocol(p) for p in websocket.scope.get("subprotocols", [])]
    try:
        upstream = await websockets.connect(
            url, additional_headers=_upstream_headers(websocket, ident, websocket=True),
            subprotocols=protocols or None, max_size=None, open_timeout=10,
            compression=None)
    except (OSError, websockets.InvalidHandshake, TimeoutError):
        await websocket.close(code=1011)
        return
    await websocket.accept(subprotocol=upstream.subprotocol)

    async def to_upstream() -> None:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if ident.session is not None and st.sessions.get(ident.token) is None:
                return  # idle too long or ended meanwhile
            data = msg.get("bytes") if msg.get("bytes") is not None else msg.get("text")
            if data is not None:
                await upstream.send(data)

    async def to_client() -> None:
        async for data in upstream:
            if isinstance(data, bytes):
                await websocket.send_bytes(data)
            else:
                await websocket.send_text(data)

    async def watch() -> None:
        while True:  # users file changes (remove, disable, new password) end it too
            await asyncio.sleep(2.0)
            try:
                again = identify(websocket, touch=False)
            except AuthError:
                again = None
            if again is None or again.user.name != ident.user.name or (
                    ident.session is not None and
                    st.sessions.get(ident.token, touch=False) is None):
                return

    tasks = [asyncio.ensure_future(t()) for t in (to_upstream, to_client, watch)]
    key = ident.token or ""
    if ident.token:
        st.sockets.setdefault(key, set()).update(tasks)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        pass
    finally:
        for t in tasks:
            t.cancel()
        if ident.token and key in st.sockets:
            st.sockets[key].difference_update(tasks)
        await upstream.close()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=1008)


# --------------------------------------------------------------------------- app


class SecurityHeaders:
    """ASGI middleware: the security headers on every HTTP answer (HSTS behind TLS)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"
        path = scope.get("path", "")

        async def send_with(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                given = list(message.get("headers", []))
                has_csp = any(k.lower() == b"content-security-policy" for k, _ in given)
                headers = [(k, v) for k, v in given if k.lower() == b"content-security-policy"
                           or k.decode("latin-1").lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                            if not (has_csp and k == "content-security-policy")]
                if https:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                if path.startswith("/media/") or path in ("/", "") or "text/html" in \
                        dict(headers).get(b"content-type", b"").decode("latin-1"):
                    headers = [(k, v) for k, v in headers if k.lower() != b"cache-control"]
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with)


def create_app(config: FrontConfig, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The front as an ASGI app. ``extra_routes`` (e.g. a DICOMweb ``Mount`` wrapped with
    ``requires_user``) are matched before the catch-all proxy to Streamlit."""
    state = FrontState(config, SessionStore(config.idle_s, config.absolute_s),
                       SigninLimiter(config.user_limit, config.address_limit, config.window_s))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0),
                                         follow_redirects=False)
        if config.bus is not None:
            try:
                state.bus = await EventBus.connect(config.bus, ensure_stream=False)
            except Exception as exc:  # noqa: BLE001 - serve pages; sign-ins logged only
                log.error("event log unreachable (%s): sign-in events are not recorded",
                          type(exc).__name__)
        try:
            yield
        finally:
            await state.client.aclose()
            if state.bus is not None:
                await state.bus.close()

    routes: list[BaseRoute] = [
        Route("/_lm/signin", signin_get, methods=["GET"]),
        Route("/_lm/signin", signin_post, methods=["POST"]),
        Route("/_lm/signout", signout_get, methods=["GET"]),
        Route("/_lm/signout", signout_post, methods=["POST"]),
        Route("/_lm/password", password_get, methods=["GET"]),
        Route("/_lm/password", password_post, methods=["POST"]),
        Route("/_lm/style.css", style, methods=["GET"]),
        Route("/_lm/health", health, methods=["GET"]),
        Route("/_stcore/health", stcore_health, methods=["GET", "HEAD"]),
        *extra_routes,
        WebSocketRoute("/_stcore/stream", proxy_ws),
        Route("/{path:path}", proxy_http,
              methods=["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.front = state
    app.state.limits_noted = {}
    app.add_middleware(SecurityHeaders)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dashboards.front --host H --port P`` (settings from the environment)."""
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--trusted-proxies", default="",
                   help="addresses whose X-Forwarded-For/-Proto are believed (none by default)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(FrontConfig.from_env())
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                proxy_headers=bool(args.trusted_proxies),
                forwarded_allow_ips=args.trusted_proxies or None,
                ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
                ssl_keyfile=str(args.tls_key) if args.tls_key else None,
                server_header=False, access_log=False, ws_max_size=16 * 1024 * 1024,
                ws_per_message_deflate=False)


if __name__ == "__main__":
    main()

