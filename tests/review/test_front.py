"""The pages' authenticating front (dashboards/front.py) attacked as issue 18 did it: real
HTTP requests (httpx) and Debian Chromium (Playwright) against the front, with Streamlit
behind it, on the seeded review site (real nats-server, real pipeline results).

Each test names the issue item it closes; on the code before the front each would fail
(a copied token worked for 12 h, guesses were unlimited and unrecorded, /media answered
anyone, a deflate bomb was accepted, comments rendered as markdown)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from playwright.sync_api import expect

from bench.dashboards import wait_for_page
from bench.review import review_dashboard, sign_in, wait_case, write_user
from events.catalogue import (
    CaseViewed,
    EditSubmitted,
    PasswordChanged,
    ReviewSubmitted,
    SessionEnd,
    SessionEnded,
    SigninFailed,
    SigninFailure,
    SigninSucceeded,
)
from events.subjects import type_filter
from tests.review.conftest import ARTIFACTS, PASSWORD, ReviewSite, deflate_bomb, wait_rows

pytestmark = [pytest.mark.server, pytest.mark.slow]

STRONG = "cobalt lantern ferry quartz"


def client(site: ReviewSite | str, token: str | None = None) -> httpx.Client:
    base = site if isinstance(site, str) else site.url
    headers = {"cookie": f"lm_session={token}"} if token else {}
    return httpx.Client(base_url=base, follow_redirects=False, headers=headers, timeout=60)


def signin(c: httpx.Client, name: str, password: str) -> httpx.Response:
    return c.post("/_lm/signin", data={"name": name, "password": password, "next": "/"})


def token_of(r: httpx.Response) -> str:
    assert r.status_code == 303, (r.status_code, r.text[:300])
    m = re.search(r"lm_session=([^;]+)", r.headers["set-cookie"])
    assert m, r.headers["set-cookie"]
    return m.group(1)


def csrf(c: httpx.Client, path: str) -> str:
    r = c.get(path)
    m = re.search(r'name=csrf\s+value="([^"]+)"', r.text)
    assert m, r.text[:500]
    return m.group(1)


def events(site: ReviewSite, cls: Any) -> list[Any]:
    async def go(bus: Any) -> list[Any]:
        return [e async for _, e, _ in bus.read(filter_subject=type_filter(cls.type_name()))
                if isinstance(e, cls)]

    out: list[Any] = site.run(go)
    return out


def wait_events(site: ReviewSite, cls: Any, pred: Any, timeout_s: float = 20.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    found: list[Any] = []
    while time.monotonic() < deadline:
        found = [e for e in events(site, cls) if pred(e)]
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"no matching {cls.type_name()} event; saw {found}")


def lastmile_cli(site: ReviewSite, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "LASTMILE_USERS_FILE": str(site.users_file)}
    return subprocess.run([sys.executable, "-m", "lastmile", "--state-dir", str(site.state),
                           "--nats-url", site.bus.servers[0], *args],  # the site's server
                          capture_output=True, text=True, env=env, timeout=120)


# --------------------------------------------------------------------------- item 10


def test_a_copied_cookie_stops_working_after_sign_out_and_open_pages_are_closed(
        review_site: ReviewSite, context: Any) -> None:
    site = review_site
    page = context.new_page()
    page.goto(f"{site.url}/worklist")
    sign_in(page, "reader.a", PASSWORD)
    wait_for_page(page)
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    (cookie,) = [c for c in context.cookies() if c["name"] == "lm_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain HTTP here; Secure behind TLS (test below)
    assert "lm_session" not in page.evaluate("() => document.cookie")  # not for scripts
    token = cookie["value"]
    with client(site, token) as stolen:  # the copied cookie works... until sign-out
        assert stolen.get("/worklist", headers={"accept": "text/html"}).status_code == 200
    other = context.new_page()  # a second tab of the same session, page connection open
    closed: list[bool] = []
    other.on("websocket", lambda ws: ws.on("close", lambda _ws: closed.append(True)))
    other.goto(f"{site.url}/worklist")
    wait_for_page(other)
    page.goto(f"{site.url}/_lm/signout")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You are signed out.")).to_be_visible()
    with client(site, token) as stolen:
        r = stolen.get("/worklist", headers={"accept": "text/html"})
        assert r.status_code == 303 and r.headers["location"].startswith("/_lm/signin")
        assert stolen.get("/_stcore/host-config").status_code == 401
    deadline = time.monotonic() + 15
    while not closed and time.monotonic() < deadline:
        other.wait_for_timeout(200)
    assert closed, "the open page's connection outlived the session"
    other.reload()
    expect(other.get_by_role("button", name="Sign in")).to_be_visible()
    ended = wait_events(site, SessionEnded, lambda e: e.user == "reader.a")
    assert ended[-1].reason == SessionEnd.SIGNED_OUT and ended[-1].actor == "reader.a"
    assert wait_events(site, SigninSucceeded, lambda e: e.user == "reader.a")


def test_password_change_disable_and_removal_end_sessions(review_site: ReviewSite) -> None:
    site = review_site
    write_user(site.users_file, "gov.two", PASSWORD, ["governance"])
    with client(site) as a, client(site) as b:
        token_a = token_of(signin(a, "gov.two", PASSWORD))
        token_b = token_of(signin(b, "gov.two", PASSWORD))
    with client(site, token_a) as a:
        form = {"csrf": csrf(a, "/_lm/password"), "current": PASSWORD}
        r = a.post("/_lm/password", data={**form, "new": "password1234",
                                          "repeat": "password1234"})
        assert r.status_code == 400 and "too weak" in r.text
        assert a.post("/_lm/password", data={**form, "csrf": "forged", "new": STRONG,
                                              "repeat": STRONG}).status_code == 403
        r = a.post("/_lm/password", data={**form, "new": STRONG, "repeat": STRONG})
        assert r.status_code == 200 and "Password changed" in r.text
        token_a = re.search(r"lm_session=([^;]+)", r.headers["set-cookie"]).group(1)  # type: ignore[union-attr]
    with client(site, token_b) as b:  # the other session ended with the old password
        assert b.get("/", headers={"accept": "text/html"}).status_code == 303
    with client(site, token_a) as a:
        assert a.get("/", headers={"accept": "text/html"}).status_code == 200
    assert wait_events(site, PasswordChanged, lambda e: e.user == "gov.two")
    (ended,) = wait_events(site, SessionEnded, lambda e: e.user == "gov.two")
    assert ended.reason == SessionEnd.PASSWORD_CHANGED and ended.sessions == 2
    # `lastmile users disable` ends it at once, and refuses the password
    done = lastmile_cli(site, "users", "disable", "gov.two")
    assert done.returncode == 0, done.stderr
    with client(site, token_a) as a:
        assert a.get("/", headers={"accept": "text/html"}).status_code == 303
    with client(site) as c:
        assert signin(c, "gov.two", STRONG).status_code == 401
    assert lastmile_cli(site, "users", "enable", "gov.two").returncode == 0
    with client(site) as c:
        token = token_of(signin(c, "gov.two", STRONG))
    done = lastmile_cli(site, "users", "remove", "gov.two")
    assert done.returncode == 0, done.stderr
    with client(site, token) as c:
        assert c.get("/", headers={"accept": "text/html"}).status_code == 303
    refused = wait_events(site, SigninFailed, lambda e: e.user == "gov.two")
    assert refused[0].reason == SigninFailure.DISABLED


def test_headers_cookies_and_streamlit_trusts_only_the_front(
        review_site: ReviewSite, chromium: Any) -> None:
    site = review_site
    with client(site) as c:
        r = signin(c, "reader.a", PASSWORD)
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert "secure" not in cookie and "max-age" not in cookie and "expires" not in cookie
        page = c.get("/worklist", headers={"accept": "text/html"},
                     cookies={"lm_session": token_of(r)})
        h = page.headers
        assert page.status_code == 200 and "<script" in page.text
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert re.search(r"script-src 'self' 'sha256-[A-Za-z0-9+/=]+' 'unsafe-eval';",
                         h["content-security-policy"]), h["content-security-policy"]
        assert "unsafe-inline" not in h["content-security-policy"].split("style-src")[0]
        assert "img-src 'self' data: blob:;" in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "same-origin" and h["cache-control"] == "no-store"
    with client(site) as c:  # a forged identity header from the client is not an identity
        forged = c.get("/worklist", headers={"accept": "text/html",
                                              "X-Lastmile-User": "gov.one"})
        assert forged.status_code == 303
    # Streamlit's own port: nothing without the front's secret, whatever headers say
    upstream = site.extra["pages"].streamlit.url
    ctx = chromium.new_context(extra_http_headers={"X-Lastmile-User": "gov.one",
                                                   "X-Lastmile-Front": "guess"})
    page = ctx.new_page()
    page.goto(f"{upstream}/overview")
    expect(page.get_by_text("Open Lastmile's pages at the dashboard address")).to_be_visible(
        timeout=60_000)
    assert page.get_by_text("Signed in as").count() == 0
    ctx.close()


def test_cookies_are_secure_behind_tls(review_site: ReviewSite, tmp_path: Path) -> None:
    """The front serving HTTPS itself (a throw-away self-signed certificate)."""
    from events.nats_server import free_port

    site = review_site
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with review_dashboard(site.db, site.bus, site.state, site.users_file, free_port(),
                          extra_env={"LASTMILE_FRONT_TLS_CERT": str(cert),
                                     "LASTMILE_FRONT_TLS_KEY": str(key)}) as proc:
        assert proc.url.startswith("https://")
        with httpx.Client(base_url=proc.url, verify=False, follow_redirects=False) as c:
            r = signin(c, "reader.a", PASSWORD)
            assert r.status_code == 303
            assert "secure" in r.headers["set-cookie"].lower()
            assert r.headers["strict-transport-security"].startswith("max-age=")


# --------------------------------------------------------------------------- item 11


def test_41_guesses_hit_the_limits_and_each_lock_is_an_event(
        review_site: ReviewSite, chromium: Any) -> None:
    """Its own front (limits live in the front's process), so the shared site's address
    is not locked for the other tests."""
    from events.nats_server import free_port

    site = review_site
    with review_dashboard(site.db, site.bus, site.state, site.users_file, free_port(),
                          extra_env={"LASTMILE_SIGNIN_ADDRESS_LIMIT": "25"}) as proc:
        codes = []
        for i in range(41):
            with client(proc.url) as c:  # a new client each time: nothing kept client-side
                codes.append(signin(c, "reader.b", f"guess number {i}").status_code)
        assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}, codes
        with client(proc.url) as c:  # the right password, too late: still locked
            r = signin(c, "reader.b", PASSWORD)
            assert r.status_code == 429 and "Too many failed sign-ins" in r.text
            assert int(r.headers["retry-after"]) > 0
        # a reload in a real browser shows the same lock
        page = chromium.new_page()
        page.goto(f"{proc.url}/worklist")
        sign_in(page, "reader.b", PASSWORD)
        expect(page.get_by_text("Too many failed sign-ins for this user name")).to_be_visible()
        page.close()
        # one address trying many names: locked by address (10 failures above + 15 here)
        for i in range(15):
            with client(proc.url) as c:
                assert signin(c, f"nobody{i}", "x").status_code == 401
        with client(proc.url) as c:
            r = signin(c, "reader.a", PASSWORD)
            assert r.status_code == 429 and "this address" in r.text
    failed = wait_events(site, SigninFailed, lambda e: e.reason in (
        SigninFailure.USER_LIMITED, SigninFailure.ADDRESS_LIMITED))
    assert [e.reason for e in failed] == [SigninFailure.USER_LIMITED,
                                          SigninFailure.ADDRESS_LIMITED]  # once per lock
    assert failed[0].user == "reader.b" and failed[0].failures == 10
    assert failed[0].retry_after_s and failed[0].retry_after_s > 0
    wrong = [e for e in events(site, SigninFailed) if e.user == "reader.b"
             and e.reason == SigninFailure.WRONG_PASSWORD]
    assert len(wrong) >= 10
    unknown = [e for e in events(site, SigninFailed) if e.reason == SigninFailure.UNKNOWN_USER]
    assert len(unknown) >= 15 and all(e.user is None for e in unknown)  # names not kept
    wait_rows(site, "SELECT count(*) FROM access WHERE kind = 'signin_failed' "
              "AND reason = 'user_limited'", 1)


# --------------------------------------------------------------------------- item 12


def test_media_only_to_a_signed_in_governance_user_and_no_case_image_in_media(
        review_site: ReviewSite, context: Any) -> None:
    site = review_site
    _, bts = site.seeded.results["bts"]
    page = context.new_page()
    page.goto(f"{site.url}/audit?study={bts.study_uid}")
    sign_in(page, "gov.one", PASSWORD)
    wait_for_page(page)
    expect(page.get_by_role("heading", name=re.compile(r"^\d+ events$"))).to_be_visible()
    button = page.locator(".st-key-audit-json button").first
    expect(button).to_be_visible(timeout=90_000)
    with page.expect_download(timeout=90_000) as dl:
        button.click(timeout=90_000)
    url = dl.value.url
    assert "/media/" in url
    path = url[url.index("/media/"):]
    gov = [c["value"] for c in context.cookies() if c["name"] == "lm_session"][0]
    with client(site, gov) as c:
        r = c.get(path)
        assert r.status_code == 200 and (bts.study_uid or "?") in r.text
        assert r.headers["cache-control"] == "no-store"
    with client(site) as anyone:
        assert anyone.get(path).status_code == 401
        reader = token_of(signin(anyone, "reader.a", PASSWORD))
    with client(site, reader) as c:
        assert c.get(path).status_code == 403
    # a reader's case page: the images are in the page, none has a /media URL
    reader_page = context.browser.new_context().new_page()
    reader_page.goto(f"{site.url}/case?study={bts.study_uid}")
    sign_in(reader_page, "reader.a", PASSWORD)
    wait_case(reader_page)
    srcs = reader_page.eval_on_selector_all("img", "els => els.map(e => e.src)")
    assert srcs and not [s for s in srcs if "/media/" in s], srcs
    assert any(s.startswith("data:image/png;base64,") for s in srcs)
    reader_page.context.close()


# --------------------------------------------------------------------------- item 13


def test_uploads_need_a_session_and_a_deflate_bomb_is_refused_with_its_size(
        review_site: ReviewSite, context: Any, tmp_path: Path) -> None:
    site = review_site
    _, bts = site.seeded.results["bts"]
    study = bts.study_uid or ""
    with client(site) as anyone:  # the upload endpoint, never signed in
        r = anyone.put("/_stcore/upload_file/s/f", files={"file": ("x.dcm", b"DICM" * 100)})
        assert r.status_code == 401
        token = token_of(signin(anyone, "reader.b", PASSWORD))
    # signed in, declaring 200 MB: refused before the body is read (a raw socket, since an
    # HTTP client will not send fewer bytes than it declares)
    host, port = site.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"PUT /_stcore/upload_file/s/f HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Cookie: lm_session={token}\r\nContent-Length: {200 * 1024 * 1024}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + b"x" * 1024)
        answer = ""
        while "larger than" not in answer:  # the status line and the body may come apart
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413") and "larger than 128 MB" in answer, answer
    ai_seg = pydicom.dcmread(next(site.state / "results" / k for k in bts.result_keys
                                  if Path(k).name.startswith("seg-")))
    bomb = deflate_bomb(ai_seg, tmp_path / "corrected.dcm")
    assert bomb.stat().st_size < 2 * 1024 * 1024
    before = {e.event_id for e in site.history(study)}
    page = context.new_page()
    page.goto(f"{site.url}/case?study={study}&run={bts.run_key}")
    sign_in(page, "reader.b", PASSWORD)
    wait_case(page)
    page.locator('input[type="file"]').set_input_files(str(bomb))
    page.get_by_role("button", name="Submit corrected segmentation").click()
    expect(page.get_by_text("the file inflates to more than 128 MB")).to_be_visible(
        timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "upload-bomb-refused.png"), full_page=True)
    time.sleep(1.0)
    new = [e for e in site.history(study) if e.event_id not in before]
    assert not [e for e in new if isinstance(e, EditSubmitted)]


# --------------------------------------------------------------------------- item 14


ATTACK = ("[click](http://attacker.invalid/x) ![p](http://127.0.0.1:9/pixel.png) "
          ":red[SESSION EXPIRED]")


def test_comments_and_url_parameters_render_as_text(
        review_site: ReviewSite, context: Any) -> None:
    site = review_site
    _, bts = site.seeded.results["bts"]
    study = bts.study_uid or ""
    site.publish(bts.caused(ReviewSubmitted, actor="reader.c", run_key=bts.run_key,
                            reader="reader.c", agree={"lesion": True}, comment=ATTACK))
    page = open_case(context, site, f"/case?study={study}&run={bts.run_key}", "reader.b")
    # wait_case returns once the image is drawn; the review column may come a moment
    # later, so wait for one of its two states (reader.b's own read may exist already
    # when the module's other tests ran first) before deciding to click
    agree = page.get_by_role("button", name="Agree with AI and submit")
    expect(agree.or_(page.get_by_role("heading", name="Reads of this case"))).to_be_visible(
        timeout=30_000)
    if agree.count():
        agree.click()
    expect(page.get_by_role("heading", name="Reads of this case")).to_be_visible(
        timeout=30_000)
    expect(page.get_by_text(ATTACK)).to_be_visible()  # the comment, literally
    links = page.locator('a[href^="http://attacker"]')
    assert links.count() == 0, links.first.evaluate(
        "e => e.closest('[data-testid=stElementContainer]').outerHTML.slice(0, 3000)")
    assert page.locator('img[src*="pixel.png"]').count() == 0
    page.screenshot(path=str(ARTIFACTS / "comment-as-text.png"), full_page=True)
    # a crafted deep link: the parameter is shown as it is, never as a link
    evil = "[SESSION EXPIRED - click here](http://attacker.invalid/login)"
    page.goto(f"{site.url}/case?study={urllib.parse.quote(evil)}")
    wait_for_page(page)
    caption = page.locator('[data-testid="stCaptionContainer"]').filter(has_text="Study")
    expect(caption.first).to_be_visible()
    # shown as typed (an invisible word joiner keeps "://" from becoming a link)
    assert f"Study {evil}" in caption.first.inner_text().replace("\u2060", "")
    assert page.locator('a[href^="http://attacker"]').count() == 0
    # the case view is an event of the study, and a row of the access table
    viewed = [e for e in site.history(study) if isinstance(e, CaseViewed)
              and e.reader == "reader.b"]
    assert viewed and viewed[0].run_key == bts.run_key and viewed[0].page == "case"
    wait_rows(site, "SELECT count(*) FROM access WHERE kind = 'viewed' "
              f"AND user = 'reader.b' AND run_key = '{bts.run_key}'", 1)


def open_case(context: Any, site: ReviewSite, path: str, user: str) -> Any:
    page = context.new_page()
    page.goto(f"{site.url}{path}")
    sign_in(page, user, PASSWORD)
    wait_case(page)
    return page
