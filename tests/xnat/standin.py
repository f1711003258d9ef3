"""A STAND-IN for an XNAT server: the REST endpoints the real ``xnat`` client calls.

No XNAT server can run on these machines (README, "What is verified here"), so the tests of the
XNAT publisher and the feedback poller drive the REAL client (``xnat.connect``, xnatpy
0.8.1, unmodified) against this small in-memory HTTP server instead. It is a stand-in,
not XNAT: it keeps projects, subjects, experiments (image sessions), scans, assessors,
resources, files, custom fields and OHIF ROI collections in memory, and answers in the
shapes xnatpy parses (``/work/shared/reference/xnat-rest-notes.md``):

- login: ``PUT /data/services/auth`` (form ``username``/``password``; the body is the
  session token, also set as the ``JSESSIONID`` cookie), ``GET /data/auth``
  ("User 'x' is logged in"), ``GET|DELETE /data/JSESSION``; 401 for bad credentials;
- version and model: ``/data/version`` (404, as on 1.7+), ``/xapi/siteConfig/buildInfo``,
  ``/xapi/schemas`` and the real XNAT schema files (vendored in ``schemas/``, BSD, WUSTL),
  ``/data/search/elements[/<type>]``;
- listings as ``{"ResultSet": {"Result": [...], "totalRecords": "n"}}``, objects as
  ``{"items": [{"data_fields", "meta", "children"}]}``, creation by ``PUT ...?xsiType=
  ...&req_format=qs&<xpath>=<value>`` answering the new ID in the body, fields set by
  ``.../fields/field[name=k]/field=v`` xpaths (names lower-cased, as XNAT does);
- resources answer their GET with an XML catalog (as XNAT 1.7.5.3+ does), files are
  raw bodies (``PUT .../files/<name>[?overwrite=true]``, 409 when present without it);
- ``PUT /xapi/roi/projects/{P}/sessions/{E}/collections/{label}?type=SEG``: the OHIF
  viewer plugin's ROI collection import.

Fault injection for the error paths: ``fail_uploads`` (next N file uploads answer 500),
``hang`` (requests block until released: a server that stopped answering), ``stop()``
then ``start()`` on the same port (a server that is down, then back with its data).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from events.nats_server import free_port

SCHEMA_DIR = Path(__file__).parent / "schemas"
XNAT_VERSION = "1.8.10"
SEARCH_ELEMENTS = ("xnat:projectData", "xnat:subjectData", "xnat:mrSessionData",
                   "xnat:ctSessionData", "xnat:crSessionData", "xnat:dxSessionData")
FIELD_XPATH = re.compile(r"^[\w:]+/fields/field\[name=(?P<name>[^\]]+)\]/field$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@dataclass
class StoredFile:
    name: str
    data: bytes
    content_type: str

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()  # noqa: S324 - XNAT's catalog digest


@dataclass
class Resource:
    id: str
    label: str
    format: str | None
    files: dict[str, StoredFile] = field(default_factory=dict)


@dataclass
class Experiment:
    """An image session or an assessor (XNAT keeps both as experiments)."""

    id: str
    label: str
    project: str
    xsi_type: str
    subject_id: str | None = None
    session_id: str | None = None  # for assessors: the image session they assess
    fields: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Resource] = field(default_factory=dict)
    scans: dict[str, Experiment] = field(default_factory=dict)
    inserted: str = field(default_factory=_now)


@dataclass
class Subject:
    id: str
    label: str
    project: str
    inserted: str = field(default_factory=_now)


@dataclass
class RoiCollection:
    label: str
    type: str
    data: bytes


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]


class XnatStandIn:
    """The stand-in server: ``with XnatStandIn(users={"lm": "pw"}) as x: x.url``."""

    def __init__(self, users: dict[str, str] | None = None, *, port: int | None = None) -> None:
        self.users = dict(users or {"lastmile": "secret"})
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.lock = threading.RLock()
        self.tokens: dict[str, str] = {}
        self.projects: dict[str, dict[str, str]] = {}
        self.subjects: dict[str, Subject] = {}
        self.experiments: dict[str, Experiment] = {}
        self.roi: dict[tuple[str, str], dict[str, RoiCollection]] = {}
        self.requests: list[Request] = []
        self.fail_uploads = 0  # the next N file/ROI uploads answer 500
        self.hang = threading.Event()  # set: every request blocks until cleared (or stop)
        self._ids = itertools.count(1)
        self._res_ids = itertools.count(1000)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._released = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> XnatStandIn:
        standin = self

        class Handler(_Handler):
            server_state = standin

        ThreadingHTTPServer.allow_reuse_address = True
        self._released.clear()
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="xnat-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (the data stays: ``start()`` again brings it back)."""
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> XnatStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def add_project(self, project_id: str, name: str | None = None) -> None:
        with self.lock:
            self.projects.setdefault(project_id, {"ID": project_id, "name": name or project_id,
                                                  "secondary_ID": project_id})

    def session_by_label(self, project: str, label: str) -> Experiment | None:
        with self.lock:
            return next((e for e in self.experiments.values()
                         if e.project == project and e.label == label and e.session_id is None),
                        None)

    def assessors_of(self, session_id: str) -> list[Experiment]:
        with self.lock:
            return [e for e in self.experiments.values() if e.session_id == session_id]

    def new_id(self, prefix: str) -> str:
        return f"XNAT_{prefix}{next(self._ids):05d}"

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for r in self.requests if r.method == method and rx.search(r.path))


class _Handler(BaseHTTPRequestHandler):
    """One request. Routing is a small table on the normalised path."""

    server_state: XnatStandIn
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every response (as for DCMTK, see anchors)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass  # quiet: tests read ``requests`` instead

    # -------------------------------------------------------------- plumbing

    def do_GET(self) -> None:  # noqa: N802 - http.server names
        self._dispatch("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, body: bytes | str | Any = b"", content_type: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            content_type = "application/json"
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _user(self) -> str | None:
        st = self.server_state
        cookies = self.headers.get("Cookie", "")
        m = re.search(r"JSESSIONID=([^;\s]+)", cookies)
        if m and m.group(1) in st.tokens:
            return st.tokens[m.group(1)]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if st.users.get(user) == pw:
                return user
        return None

    def _dispatch(self, method: str) -> None:
        st = self.server_state
        parts = urlsplit(self.path)
        path = unquote(parts.path).rstrip("/") or "/"
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        body = self._body() if method in ("PUT", "POST") else b""
        with st.lock:
            st.requests.append(Request(method, path, query))
        while st.hang.is_set() and not st._released.is_set():
            time.sleep(0.02)
        if st._released.is_set():
            return
        try:
            self._route(method, path, query, body)
        except _Reply as r:
            self._send(r.status, r.body, r.content_type)

    # -------------------------------------------------------------- routes

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        st = self.server_state
        if path == "/" and method == "GET":
            return self._send(200, "<html><body>XNAT stand-in</body></html>", "text/html")
        if path == "/data/services/auth" and method == "PUT":
            form = dict(parse_qsl(body.decode()))
            user, pw = form.get("username"), form.get("password")
            if user is None or st.users.get(user) != pw:
                return self._send(401, "<html><body><h3>Login attempt failed. Please try again."
                                       "</h3></body></html>", "text/html")
            token = hashlib.sha256(f"{user}{time.time_ns()}".encode()).hexdigest()[:32].upper()
            with st.lock:
                st.tokens[token] = user
            return self._send(200, token, headers={"Set-Cookie": f"JSESSIONID={token}; Path=/"})
        user = self._user()
        if user is None:
            return self._send(401, "<html><body><h3>Unauthorized</h3></body></html>", "text/html")
        if path == "/data/auth":
            return self._send(200, f"User '{user}' is logged in")
        if path == "/data/JSESSION":
            if method == "DELETE":
                return self._send(200, "")
            token = next((t for t, u in st.tokens.items() if u == user), "")
            return self._send(200, token)
        if path == "/data/version":
            return self._send(404, "Not found")
        if path == "/xapi/siteConfig/buildInfo":
            return self._send(200, {"version": XNAT_VERSION, "buildNumber": "standin"})
        if path == "/xapi/schemas":
            return self._send(200, ["xnat", "xdat"])
        if m := re.fullmatch(r"/xapi/schemas/(\w+)", path):
            f = SCHEMA_DIR / f"{m.group(1)}.xml"
            if not f.exists():
                return self._send(404, "no such schema")
            return self._send(200, f.read_bytes(), "application/xml")
        if path == "/data/search/elements":
            return self._send(200, _result_set([{"ELEMENT_NAME": e, "PLURAL": e}
                                                for e in SEARCH_ELEMENTS]))
        if m := re.fullmatch(r"/data/search/elements/([\w:]+)", path):
            names = ("ID", "LABEL", "PROJECT", "INSERT_DATE")
            return self._send(200, _result_set([{"FIELD_ID": f, "HEADER": f, "TYPE": "string"}
                                                for f in names]))
        if path == "/data/prearchive/projects":
            return self._send(200, _result_set([]))
        if m := re.fullmatch(r"/xapi/roi/projects/([^/]+)/sessions/([^/]+)/collections/([^/]+)",
                             path):
            return self._roi(method, m.group(1), m.group(2), m.group(3), query, body)
        if path.startswith("/data/archive/"):
            path = "/data/" + path[len("/data/archive/"):]
        elif path == "/data/archive":
            path = "/data"
        return self._archive(method, path.split("/")[2:], query, body)

    # -------------------------------------------------------------- archive tree

    def _archive(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> None:
        st = self.server_state
        with st.lock:
            if seg == ["projects"]:
                return self._send(200, _result_set([
                    {"ID": p["ID"], "URI": f"/data/projects/{p['ID']}", "name": p["name"],
                     "secondary_ID": p["secondary_ID"]} for p in st.projects.values()]))
            if seg[:1] == ["projects"] and len(seg) >= 2:
                pid = seg[1]
                if len(seg) == 2:
                    return self._project(method, pid, query)
                if pid not in st.projects:
                    raise _Reply(404, f"project {pid} not found")
                rest = seg[2:]
                if rest == ["subjects"]:
                    return self._send(200, _result_set([
                        _subject_row(s) for s in st.subjects.values() if s.project == pid]))
                if rest[0] == "subjects" and len(rest) >= 2:
                    subj = self._subject(method, pid, rest[1], query, leaf=len(rest) == 2)
                    if subj is None:
                        return None
                    if rest[2] == "experiments":
                        return self._experiments(method, rest[3:], query, body, pid, subj)
                    raise _Reply(404, "not found")
                if rest[0] == "experiments":
                    return self._experiments(method, rest[1:], query, body, pid, None)
                raise _Reply(404, "not found")
            if seg[:1] == ["experiments"]:
                return self._experiments(method, seg[1:], query, body, None, None)
            if seg[:1] == ["subjects"] and len(seg) == 2:
                s = st.subjects.get(seg[1])
                if s is None:
                    raise _Reply(404, "subject not found")
                return self._send(200, _item("xnat:subjectData", _subject_fields(s), [],
                                             s.inserted))
        raise _Reply(404, f"no route for {method} /data/{'/'.join(seg)}")

    def _project(self, method: str, pid: str, query: dict[str, str]) -> None:
        st = self.server_state
        if method == "PUT":
            name = query.get("xnat:projectData/name") or query.get("name") or pid
            created = pid not in st.projects
            st.add_project(pid, name)
            return self._send(201 if created else 200, pid)
        p = st.projects.get(pid)
        if p is None:
            raise _Reply(404, f"project {pid} not found")
        return self._send(200, _item("xnat:projectData", dict(p), [], _now()))

    def _subject(self, method: str, pid: str, key: str, query: dict[str, str], *,
                 leaf: bool) -> Subject | None:
        """Create (PUT with xsiType) or answer a subject; return it when the path goes on."""
        st = self.server_state
        subj = st.subjects.get(key) or next(
            (s for s in st.subjects.values() if s.project == pid and s.label == key), None)
        if method == "PUT" and query.get("xsiType") == "xnat:subjectData":
            if subj is None:
                label = query.get("xnat:subjectData/label", key)
                subj = Subject(st.new_id("S"), label, pid)
                st.subjects[subj.id] = subj
                self._send(201, subj.id)
            else:
                self._send(200, subj.id)
            return None
        if subj is None:
            raise _Reply(404, f"subject {key} not found")
        if leaf:
            self._send(200, _item("xnat:subjectData", _subject_fields(subj), [], subj.inserted))
            return None
        return subj

    def _experiments(self, method: str, rest: list[str], query: dict[str, str], body: bytes,
                     pid: str | None, subj: Subject | None) -> None:
        st = self.server_state
        if not rest:
            rows = [_experiment_row(e) for e in st.experiments.values()
                    if e.session_id is None and (pid is None or e.project == pid)
                    and (subj is None or e.subject_id == subj.id)]
            return self._send(200, _result_set(rows))
        key = rest[0]
        exp = st.experiments.get(key) or next(
            (e for e in st.experiments.values() if e.session_id is None and e.label == key
             and (pid is None or e.project == pid)), None)
        if len(rest) == 1 and method == "PUT" and exp is None:
            if subj is None or "xsiType" not in query:
                raise _Reply(400, "an experiment is created under a project's subject, "
                                  "with xsiType")
            xsi = query["xsiType"]
            label = query.get(f"{xsi}/label", key)
            exp = Experiment(st.new_id("E"), label, subj.project, xsi, subject_id=subj.id)
            self._apply_xpaths(exp, query)
            st.experiments[exp.id] = exp
            return self._send(201, exp.id)
        if exp is None:
            raise _Reply(404, f"experiment {key} not found")
        return self._in_experiment(method, exp, rest[1:], query, body)

    def _in_experiment(self, method: str, exp: Experiment, rest: list[str],
                       query: dict[str, str], body: bytes) -> None:
        st = self.server_state
        if not rest:
            if method == "PUT":
                self._apply_xpaths(exp, query)
                return self._send(200, exp.id)
            if method == "DELETE":
                st.experiments.pop(exp.id, None)
                return self._send(200, "")
            return self._send(200, _experiment_item(exp))
        kind = rest[0]
        if kind == "status":
            return self._send(200, "active")
        if kind == "assessors" and exp.session_id is None:
            if len(rest) == 1:
                return self._send(200, _result_set([
                    _experiment_row(a) for a in st.assessors_of(exp.id)]))
            key = rest[1]
            assessor = st.experiments.get(key) or next(
                (a for a in st.assessors_of(exp.id) if a.label == key), None)
            if assessor is None and method == "PUT" and len(rest) == 2:
                xsi = query.get("xsiType")
                if not xsi:
                    raise _Reply(400, "xsiType is required to create an assessor")
                assessor = Experiment(st.new_id("E"), query.get("label", key), exp.project, xsi,
                                      session_id=exp.id)
                self._apply_xpaths(assessor, query)
                st.experiments[assessor.id] = assessor
                return self._send(201, assessor.id)
            if assessor is None:
                raise _Reply(404, f"assessor {key} not found")
            return self._in_experiment(method, assessor, rest[2:], query, body)
        if kind == "scans" and exp.session_id is None:
            if len(rest) == 1:
                return self._send(200, _result_set([
                    {"ID": s.id, "URI": f"/data/experiments/{exp.id}/scans/{s.id}",
                     "type": s.data.get("type", ""), "xsiType": s.xsi_type}
                    for s in exp.scans.values()]))
            scan = exp.scans.get(rest[1])
            if scan is None and method == "PUT" and len(rest) == 2:
                scan = Experiment(rest[1], rest[1], exp.project, query.get("xsiType",
                                  "xnat:otherDicomScanData"), session_id=exp.id)
                self._apply_xpaths(scan, query)
                exp.scans[scan.id] = scan
                return self._send(201, scan.id)
            if scan is None:
                raise _Reply(404, "scan not found")
            if len(rest) == 2:
                return self._send(200, _item(scan.xsi_type, {"ID": scan.id, **scan.data,
                                                             "image_session_ID": exp.id}, [],
                                             scan.inserted))
            return self._in_experiment(method, scan, rest[2:], query, body)
        if kind == "resources":
            return self._resources(method, exp, rest[1:], query, body)
        if kind == "files" and len(rest) == 1:
            return self._send(200, _result_set([]))
        raise _Reply(404, f"no route under experiment {exp.id}: {'/'.join(rest)}")

    def _resources(self, method: str, owner: Experiment, rest: list[str],
                   query: dict[str, str], body: bytes) -> None:
        st = self.server_state
        if not rest:
            return self._send(200, _result_set([
                {"xnat_abstractresource_id": r.id, "label": r.label,
                 "element_name": "xnat:resourceCatalog", "category": "resources",
                 "cat_id": owner.id, "format": r.format or "", "content": "", "tags": "",
                 "file_count": str(len(r.files)),
                 "file_size": str(sum(len(f.data) for f in r.files.values()))}
                for r in owner.resources.values()]))
        key = rest[0]
        res = next((r for r in owner.resources.values() if key in (r.id, r.label)), None)
        if res is None and method == "PUT":
            res = Resource(str(next(st._res_ids)), key, query.get("format"))
            owner.resources[res.label] = res
            if len(rest) == 1:
                return self._send(200, "")
        if res is None:
            raise _Reply(404, f"resource {key} not found")
        if len(rest) == 1:
            if method == "DELETE":
                owner.resources.pop(res.label, None)
                return self._send(200, "")
            if method == "PUT":
                return self._send(200, "")
            return self._send(200, _catalog_xml(res), "text/xml")
        if rest[1] != "files":
            raise _Reply(404, "not found")
        base = f"/data/experiments/{owner.session_id or owner.id}"
        if owner.session_id is not None:
            base += f"/assessors/{owner.id}" if owner.id in st.experiments else f"/scans/{owner.id}"
        if len(rest) == 2:
            return self._send(200, _result_set([
                {"Name": f.name.rsplit("/", 1)[-1], "Size": str(len(f.data)),
                 "URI": f"{base}/resources/{res.id}/files/{f.name}", "collection": res.label,
                 "file_tags": "", "file_format": "", "file_content": "", "cat_ID": res.id,
                 "digest": f.md5} for f in res.files.values()]))
        name = "/".join(rest[2:])
        if method == "PUT" or method == "POST":
            if st.fail_uploads > 0:
                st.fail_uploads -= 1
                raise _Reply(500, "<h3>The server encountered an internal error (stand-in "
                                  "fault injection)</h3>")
            if name in res.files and query.get("overwrite") != "true":
                raise _Reply(409, f"File {name} already exists; use overwrite=true")
            res.files[name] = StoredFile(name, body, self.headers.get("Content-Type", ""))
            return self._send(200, "")
        f = res.files.get(name)
        if f is None:
            raise _Reply(404, f"file {name} not found")
        if method == "DELETE":
            res.files.pop(name)
            return self._send(200, "")
        return self._send(200, f.data, "application/octet-stream")

    def _apply_xpaths(self, exp: Experiment, query: dict[str, str]) -> None:
        for key, value in query.items():
            if m := FIELD_XPATH.match(key):
                name = m.group("name").lower()  # XNAT stores custom field names lower-cased
                if value == "NULL":
                    exp.fields.pop(name, None)
                else:
                    exp.fields[name] = value
            elif "/" in key and not key.startswith("fields"):
                attr = key.split("/", 1)[1]
                if attr == "label":
                    exp.label = value
                elif "/" not in attr:
                    exp.data[attr] = value

    def _roi(self, method: str, pid: str, session: str, label: str, query: dict[str, str],
             body: bytes) -> None:
        st = self.server_state
        with st.lock:
            exp = st.experiments.get(session)
            if pid not in st.projects or exp is None or exp.project != pid:
                raise _Reply(404, f"session {session} not found in project {pid}")
            store = st.roi.setdefault((pid, session), {})
            if method == "GET":
                c = store.get(label)
                if c is None:
                    raise _Reply(404, "no such collection")
                return self._send(200, c.data, "application/octet-stream")
            if method != "PUT":
                raise _Reply(405, "method not allowed")
            if st.fail_uploads > 0:
                st.fail_uploads -= 1
                raise _Reply(500, "ROI import failed (stand-in fault injection)")
            kind = query.get("type", "")
            if kind not in ("SEG", "RTSTRUCT", "AIM"):
                raise _Reply(400, f"unsupported collection type {kind!r}")
            if label in store and query.get("overwrite") != "true":
                raise _Reply(409, f"collection {label} exists")
            store[label] = RoiCollection(label, kind, body)
            return self._send(200, f"{session}_{label}")


class _Reply(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, status: int, body: str, content_type: str = "text/plain") -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        super().__init__(f"{status} {HTTPStatus(status).phrase}")


def _result_set(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}}


def _item(xsi: str, data: dict[str, Any], children: list[dict[str, Any]],
          inserted: str) -> dict[str, Any]:
    return {"items": [{"data_fields": data, "children": children,
                       "meta": {"xsi:type": xsi, "isHistory": False, "start_date": inserted}}]}


def _subject_fields(s: Subject) -> dict[str, str]:
    return {"ID": s.id, "label": s.label, "project": s.project}


def _subject_row(s: Subject) -> dict[str, str]:
    return {"ID": s.id, "URI": f"/data/subjects/{s.id}", "label": s.label, "project": s.project,
            "insert_date": s.inserted}


def _experiment_row(e: Experiment) -> dict[str, str]:
    row = {"ID": e.id, "URI": f"/data/experiments/{e.id}", "label": e.label,
           "xsiType": e.xsi_type, "project": e.project, "insert_date": e.inserted}
    if e.session_id:
        row["session_ID"] = e.session_id
    return row


def _experiment_item(e: Experiment) -> dict[str, Any]:
    data: dict[str, Any] = {"ID": e.id, "label": e.label, "project": e.project, **e.data}
    if e.subject_id:
        data["subject_ID"] = e.subject_id
    if e.session_id:
        data["imageSession_ID"] = e.session_id
    children = []
    if e.fields:
        children.append({"field": "fields/field", "items": [
            {"data_fields": {"name": k, "field": v}, "children": [],
             "meta": {"xsi:type": "xnat:experimentData_field", "isHistory": False}}
            for k, v in e.fields.items()]})
    return _item(e.xsi_type, data, children, e.inserted)


def _catalog_xml(r: Resource) -> str:
    entries = "".join(f'<cat:entry URI="{f.name}" ID="{f.name}" digest="{f.md5}"/>'
                      for f in r.files.values())
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog xmlns:cat='
            f'"http://nrg.wustl.edu/catalog" ID="{r.id}" label="{r.label}">'
            f"<cat:entries>{entries}</cat:entries></cat:Catalog>")
