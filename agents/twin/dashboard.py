"""The twin's health dashboard: a small HTTP server with live updates by server-sent events.

The twin builds a snapshot of what it holds (agents, hosts, start-up order, alerts, GPU leases,
pipeline figures) on its own thread and hands it over whole with `update()`; the HTTP threads
only ever read the latest one, so a slow or stuck browser never touches the twin's state.

    GET /                 the page (agents/twin/static/: HTML, CSS, JS; nothing from the network)
    GET /api/state        the latest snapshot, JSON
    GET /api/history      the pipeline figures over time (one point every history_every_s), JSON
    GET /events           text/event-stream: `state` (each new snapshot) and `history` (each new point)
    GET /healthz          "ok"

Bound to 127.0.0.1 unless configured otherwise; bound elsewhere it needs a token (TwinSettings
checks that one is set): `Authorization: Bearer TOKEN`, or `/?token=TOKEN` once, which sets an
HttpOnly cookie and redirects to the bare URL.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

STATIC = Path(__file__).resolve().parent / "static"
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/app.css": ("app.css", "text/css; charset=utf-8")}
COOKIE = "mesh_dashboard"
KEEPALIVE_S = 15.0
MAX_CLIENTS = 64
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Dashboard:
    def __init__(self, bind: str, port: int, *, token: str = "", log: logging.Logger | None = None,
                 history_len: int = 720):
        self.token = token
        self.log = log or logging.getLogger("dashboard")
        self.cond = threading.Condition()
        self.state = b"{}"
        self.version = 0
        self.history: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=history_len)
        self.history_seq = 0
        self.closing = False
        self.clients = 0
        self.files = {path: ((STATIC / name).read_bytes(), ctype) for path, (name, ctype) in FILES.items()}
        handler = type("Handler", (_Handler,), {"dashboard": self})
        self.server = ThreadingHTTPServer((bind, port), handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="dashboard", daemon=True)
        self.thread.start()

    def update(self, snapshot: dict) -> None:
        data = json.dumps(snapshot, separators=(",", ":")).encode()
        with self.cond:
            self.state = data
            self.version += 1
            self.cond.notify_all()

    def add_history(self, point: dict) -> None:
        data = json.dumps(point, separators=(",", ":")).encode()
        with self.cond:
            self.history_seq += 1
            self.history.append((self.history_seq, data))
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2)

    def authorized(self, handler: BaseHTTPRequestHandler, query: dict) -> bool | str:
        """True, False, or the token given in the query (valid: set the cookie)."""
        if not self.token:
            return True
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(handler.headers.get("Cookie", ""))
        except Exception:
            pass
        if COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value.encode(), self.token.encode()):
            return True
        given = (query.get("token") or [""])[0]
        if given and hmac.compare_digest(given.encode(), self.token.encode()):
            return "query"
        return False


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "mesh-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:   # requests are not worth a log line each
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        d = self.dashboard
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/healthz":
            return self._send(HTTPStatus.OK, b"ok\n", "text/plain")
        ok = d.authorized(self, query)
        if ok == "query":
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", url.path or "/")
            self.send_header("Set-Cookie", f"{COOKIE}={d.token}; HttpOnly; SameSite=Strict; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not ok:
            return self._send(HTTPStatus.UNAUTHORIZED, b"a token is needed: open /?token=TOKEN once "
                              b"(agents.twin.settings.dashboard_token), or send Authorization: Bearer TOKEN\n",
                              "text/plain")
        if url.path in d.files:
            body, ctype = d.files[url.path]
            return self._send(HTTPStatus.OK, body, ctype)
        if url.path == "/api/state":
            with d.cond:
                body = d.state
            return self._send(HTTPStatus.OK, body, "application/json")
        if url.path == "/api/history":
            with d.cond:
                points = [p for _, p in d.history]
            return self._send(HTTPStatus.OK, b"[" + b",".join(points) + b"]", "application/json")
        if url.path == "/events":
            return self._events()
        self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _events(self) -> None:
        d = self.dashboard
        with d.cond:
            if d.clients >= MAX_CLIENTS:
                return self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many dashboard clients\n", "text/plain")
            d.clients += 1
        self.close_connection = True
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            version, seq = -1, d.history_seq
            while True:
                with d.cond:
                    d.cond.wait_for(lambda: d.closing or d.version != version or d.history_seq != seq,
                                    timeout=KEEPALIVE_S)
                    if d.closing:
                        return
                    state = d.state if d.version != version else None
                    version = d.version
                    points = [p for n, p in d.history if n > seq]
                    seq = d.history_seq
                out = b""
                if state is not None:
                    out += b"event: state\ndata: " + state + b"\n\n"
                for p in points:
                    out += b"event: history\ndata: " + p + b"\n\n"
                self.wfile.write(out or b": keep-alive\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            pass
        finally:
            with d.cond:
                d.clients -= 1
