"""Sign-in for every page (Streamlit edge): who the user is, and the sign-in form.

Identity comes, in this order, from: the trusted reverse-proxy header (only when
``LASTMILE_AUTH_PROXY_HEADER`` is set, and only for a user in the users file), the
session (after the sign-in form), or, in demo mode with no users configured, the demo
viewer. Otherwise the page shows the sign-in form and stops; the URL (a PACS deep link
with its ``?study=``) is kept, so after sign-in the same page opens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import streamlit as st

from dashboards.config import ReviewConfig
from dashboards.review.auth import (
    AuthError,
    Role,
    User,
    Users,
    authenticate,
    check_token,
    load_users,
    make_token,
    session_key,
)
from dashboards.review.blinded import (
    BlindedStudy,
    BlindedStudyError,
    load_blinded_study,
)

DEMO_VIEWER = User("demo.viewer", frozenset({Role.READER, Role.QC, Role.GOVERNANCE}))
SESSION_KEY = "lm_user"
FAILED_KEY = "lm_failed_signins"
COOKIE = "lm_session"
TOKEN_TTL_S = 12 * 3600


@st.cache_resource
def review_config() -> ReviewConfig:
    return ReviewConfig.from_env()


@st.cache_data(ttl=5, show_spinner=False)
def _users(path: str, mtime: float) -> Users:
    from pathlib import Path

    return load_users(Path(path))


def users(cfg: ReviewConfig) -> Users:
    """The users file, re-read when it changes (``lastmile users add`` while running)."""
    path = cfg.users_file
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _users(str(path), mtime)


def current_user(cfg: ReviewConfig) -> User | None:
    try:
        known = users(cfg)
    except AuthError as exc:
        st.error(f"Sign-in is unavailable: {exc}")
        st.stop()
    if cfg.proxy_header:
        name = st.context.headers.get(cfg.proxy_header)
        if name:
            user = known.get(name.strip())
            if user is None:
                st.error(f"{name} (from the sign-in proxy) is not a Lastmile user; ask an "
                         "admin to run `lastmile users add`")
                st.stop()
            return user
    name = st.session_state.get(SESSION_KEY)
    token = st.context.cookies.get(COOKIE)
    if not name and token and not st.session_state.get("lm_signed_out"):
        name = check_token(_token_key(cfg), token, time.time())
        if name:
            st.session_state[SESSION_KEY] = name
    if name:
        user = known.get(name)
        if user is not None:
            return user
        del st.session_state[SESSION_KEY]  # removed from the users file meanwhile
    if cfg.demo and len(known) == 0:
        return DEMO_VIEWER
    return None


def sign_in_form(cfg: ReviewConfig) -> None:
    """The form shown instead of any page until the user signs in."""
    st.title("Sign in to Lastmile")
    st.caption("Reviews, QC decisions and edits are recorded under your name.")
    failures = int(st.session_state.get(FAILED_KEY, 0))
    with st.form("signin"):
        name = st.text_input("User name", key="signin_name")
        password = st.text_input("Password", type="password", key="signin_password")
        go = st.form_submit_button("Sign in", type="primary")
    if go:
        if failures >= 5:
            time.sleep(min(2.0 ** (failures - 4), 10.0))  # slow down guessing
        user = authenticate(users(cfg), name or "", password or "")
        if user is None:
            st.session_state[FAILED_KEY] = failures + 1
            st.error("Unknown user name or wrong password.")
        else:
            st.session_state[SESSION_KEY] = user.name
            st.session_state[FAILED_KEY] = 0
            st.session_state.pop("lm_signed_out", None)
            token = make_token(_token_key(cfg), user.name, int(time.time()) + TOKEN_TTL_S)
            st.session_state["lm_cookie"] = (token, TOKEN_TTL_S)
            st.rerun()
    if len(users(cfg)) == 0:
        st.info(f"No users yet: create one with `lastmile users add NAME --role reader` "
                f"(users file: {cfg.users_file}).")


def _token_key(cfg: ReviewConfig) -> bytes:
    return session_key(cfg.state_dir / "review_session_key")


def write_cookie() -> None:
    """Set (after sign-in) or clear (after sign-out) the sign-in cookie in the browser."""
    pending = st.session_state.pop("lm_cookie", None)
    if pending is None:
        return
    token, max_age = pending
    st.html(f"<script>document.cookie = {json.dumps(COOKIE)} + '=' + {json.dumps(token)} + "
            f"'; path=/; max-age={int(max_age)}; SameSite=Lax';</script>",
            unsafe_allow_javascript=True)


def sign_out() -> None:
    st.session_state["lm_signed_out"] = True
    st.session_state["lm_cookie"] = ("", 0)
    st.session_state.pop(SESSION_KEY, None)
    for key in [k for k in st.session_state if str(k).startswith("opened:")]:
        del st.session_state[key]


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
        st.error(f"The blinded study configuration cannot be read: {exc}")
        st.stop()
