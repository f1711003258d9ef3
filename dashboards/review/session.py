"""Who the user is, for every page (Streamlit edge).

The pages are served only through their authenticating front (``dashboards.front``),
which signs people in, keeps their sessions and rate limits, and passes the signed-in
user's name to this process in ``X-Lastmile-User`` next to a secret made at each start
(``X-Lastmile-Front``). Streamlit binds to 127.0.0.1 on an internal port; a request
without the secret (another local process, a browser that found the port) gets nothing
but a message. The front also decides the demo viewer (demo mode, no users yet) and the
site's trusted sign-in proxy header; this module checks the name against the users file
again, so a removed or disabled user is refused even on an open page.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import streamlit as st

from dashboards.config import HEADER_FRONT, HEADER_USER, ReviewConfig
from dashboards.review.auth import AuthError, Role, User, Users, load_users
from dashboards.review.blinded import BlindedStudy, BlindedStudyError, load_blinded_study

DEMO_VIEWER = User("demo.viewer", frozenset({Role.READER, Role.QC, Role.GOVERNANCE}))
SIGNOUT_URL = "/_lm/signout"
PASSWORD_URL = "/_lm/password"


@st.cache_resource
def review_config() -> ReviewConfig:
    return ReviewConfig.from_env()


@st.cache_data(ttl=5, show_spinner=False)
def _users(path: str, mtime: float) -> Users:
    return load_users(Path(path))


def users(cfg: ReviewConfig) -> Users:
    """The users file, re-read when it changes (``lastmile users add`` while running)."""
    path = cfg.users_file
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _users(str(path), mtime)


def from_front(cfg: ReviewConfig, headers: dict[str, str] | object) -> bool:
    """True when the request carries the front's secret (constant-time comparison)."""
    got = getattr(headers, "get", lambda _k: None)(HEADER_FRONT)
    return bool(cfg.front_secret) and isinstance(got, str) and \
        hmac.compare_digest(got.encode(), (cfg.front_secret or "").encode())


def current_user(cfg: ReviewConfig) -> User:
    """The signed-in user as the front named them; stops the page with a message for
    anything else (no front, unknown, disabled or removed user)."""
    headers = st.context.headers
    if not from_front(cfg, headers):
        st.error("Open Lastmile's pages at the dashboard address (the sign-in front), "
                 "not at Streamlit's internal port.")
        st.stop()
    name = (headers.get(HEADER_USER) or "").strip()
    try:
        known = users(cfg)
    except AuthError as exc:
        st.error("Sign-in is unavailable: the users file cannot be read.")
        st.text(str(exc))
        st.stop()
    if name == DEMO_VIEWER.name and cfg.demo and len(known) == 0:
        return DEMO_VIEWER
    user = known.get(name)
    if user is None or user.disabled:
        st.error("You are not signed in as a Lastmile user (any more): reload the page to "
                 "sign in.")
        st.stop()
    return user


def require(user: User, role: Role, what: str) -> None:
    """Stop the page with a clear message when ``user`` lacks ``role``."""
    if not user.has(role):
        st.error(f"{what} needs the {role.value} role; {user.name} has "
                 f"{', '.join(sorted(r.value for r in user.roles))}.")
        st.caption("Ask an admin to add the role (`lastmile users add NAME --role ...`).")
        st.stop()


@st.cache_resource
def _study(path: str, mtime: float) -> BlindedStudy:
    return load_blinded_study(Path(path))


def blinded_study() -> BlindedStudy | None:
    cfg = review_config()
    if cfg.blinded_study is None:
        return None
    try:
        return _study(str(cfg.blinded_study), cfg.blinded_study.stat().st_mtime)
    except (OSError, BlindedStudyError) as exc:
        st.error("The blinded study configuration cannot be used:")
        st.text(str(exc))
        st.stop()
