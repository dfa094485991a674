"""Request/reply: a ROUTER server with typed handlers, and two clients.

* `RpcServer` answers every frame it receives: a handler's reply, or a typed `mesh.error`
  (undecodable, too large, unknown type, bad version, invalid body, no handler, handler error).
  Replies are remembered by request id, so a retried request is answered again without being
  handled twice.
* `RpcClient` is the blocking Lazy Pirate client (REQ, poll with a timeout, close and reopen
  the socket on timeout, resend the same id a bounded number of times). For tools and tests.
* `Peer` is the same protocol inside a reactor (DEALER, non-blocking, callbacks), used by agents
  so that a slow or missing peer never stalls their own loop; each request keeps its own deadline
  and attempt count.

Clients raise (or pass to callbacks) only `MeshError`s: a typed error reply, a `timeout`, or a
garbled reply under the codec's code (a `ProtocolError` never escapes them).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import zmq
from zmq.backend import Socket as SocketBase

from network.codec import DEFAULT_MAX_FRAME_BYTES, Envelope, ProtocolError, decode, encode
from network.messages import Error, ErrorCode, Message, Ping
from network.metrics import MeshMetrics
from network.reactor import Reactor, Timer
from network.security import CurveIdentity, Guard, RefusalMonitor

log = logging.getLogger(__name__)

_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVTIMEO = int(zmq.RCVTIMEO)
_SNDTIMEO = int(zmq.SNDTIMEO)


_send = SocketBase.send   # pyzmq's own send, under the Python wrapper that only adds routing_id and group


def _send_frames(sock: zmq.Socket, frames: list[bytes], flags: int = 0) -> None:
    """send_multipart without its per-call type checks and enum flag arithmetic, each frame by the Cython send."""
    more = _SNDMORE | flags
    for f in frames[:-1]:
        _send(sock, f, more)
    _send(sock, frames[-1], flags)


def _recv_frames(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """recv_multipart without its getsockopt(RCVMORE) per frame (a SocketOption enum lookup and a
    call, ~1.5 us a frame): a zero-copy Frame already carries its `more` flag. Raises zmq.Again like
    recv_multipart(NOBLOCK) when nothing is waiting; the later frames of a message are there at once."""
    recv = sock.recv
    f = recv(flags, copy=False)
    parts = [f.bytes]
    while f.more:
        f = recv(flags, copy=False)
        parts.append(f.bytes)
    return parts

Handler = Callable[[Message, Envelope], "Message | Deferred"]


class Deferred:
    """A reply a handler gives later: it returns `Deferred()` at once, hands the work to a pool,
    and calls `resolve(reply)` or `fail(code, message)` on the reactor's thread when it is done.

    Until then a repeat of the request (a client's Lazy Pirate retry) is not handled again: the
    reply goes to every copy's sender when it comes."""

    __slots__ = ("_server", "_heads", "_id", "_type", "_started", "_outcome", "done")

    def __init__(self) -> None:
        self._server: RpcServer | None = None
        self._heads: list[list[bytes]] = []
        self._id = b""
        self._type = ""
        self._started = 0.0
        self._outcome: tuple | None = None
        self.done = False

    def resolve(self, reply: Message) -> None:
        self._settle(("reply", reply))

    def fail(self, code: str, message: str, detail: dict | None = None) -> None:
        self._settle(("error", str(code), message, detail))

    def _bind(self, server: RpcServer, head: list[bytes], msg_id: bytes, type_name: str, started: float) -> None:
        self._server, self._heads, self._id, self._type, self._started = server, [head], msg_id, type_name, started
        if self._outcome is not None:
            self._send()

    def _settle(self, outcome: tuple) -> None:
        if self.done:
            return
        self.done = True
        self._outcome = outcome
        if self._server is not None:
            self._send()

    def _send(self) -> None:
        server, outcome = self._server, self._outcome
        server._inflight.pop(self._id, None)
        if server.socket.closed:
            return  # the agent stopped meanwhile; the client will retry elsewhere or later
        for head in self._heads:
            if outcome[0] == "reply":
                server._reply(head, self._id, self._type, outcome[1], self._started)
            else:
                server._fail(head, outcome[1], outcome[2], cid=self._id, detail=outcome[3])


def client_socket(ctx: zmq.Context, kind: int, endpoint: str, *, guard: Guard, server_host: str | None,
                  max_frame_bytes: int) -> zmq.Socket:
    """A connected client socket with CURVE set for `server_host` (closed again if the key is missing)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.maxmsgsize = _hard_limit(max_frame_bytes)
    try:
        guard.client(sock, server_host or "")
    except Exception:
        sock.close(linger=0)
        raise
    sock.connect(endpoint)
    return sock


class BoundSocket:
    """A server socket (ROUTER or PUB): CURVE server when the guard has keys, refusals logged and counted."""

    what = "connection"

    def _bind(self, ctx: zmq.Context, kind: int, guard: Guard | None, metrics: MeshMetrics) -> None:
        self.metrics = metrics
        self.socket = ctx.socket(kind)
        self.socket.linger = 0
        guard = guard or Guard(ctx, None)
        guard.server(self.socket)
        self.monitor = RefusalMonitor(self.socket, self._refused) if guard.enabled else None

    def _listen(self, bind: str) -> None:
        self.socket.bind(bind)
        self.endpoint = self.socket.last_endpoint.decode()

    def _refused(self, reason: str, endpoint: str) -> None:
        log.warning("refused a %s on %s: CURVE %s failure (wrong or missing client key?)", self.what, endpoint, reason)
        self.metrics.auth_refused(reason)

    def close(self) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close()
        self.socket.close(linger=0)


class MeshError(Exception):
    """A request that was not handled. Raised by handlers to reply with a typed error, and by
    clients when the reply is a `mesh.error`."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message
        self.detail = detail or {}


class RequestTimeout(MeshError):
    def __init__(self, message: str):
        super().__init__("timeout", message)


def _hard_limit(max_frame_bytes: int) -> int:
    # Frames between the soft limit and this one get a typed `too_large` reply; beyond it ZeroMQ
    # drops the connection without reading the frame into memory.
    return max(4 * max_frame_bytes, 1 << 20)


class RpcServer(BoundSocket):
    def __init__(self, ctx: zmq.Context, bind: str, *, sender: str, metrics: MeshMetrics, guard: Guard | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, reply_cache: int = 4096):
        self.sender = sender
        self.max_frame_bytes = max_frame_bytes
        self.handlers: dict[str, Handler] = {}
        self.draining = False
        self._replies: OrderedDict[bytes, bytes] = OrderedDict()
        self._reply_cache = reply_cache
        self._inflight: dict[bytes, Deferred] = {}
        self._bind(ctx, zmq.ROUTER, guard, metrics)
        self.socket.maxmsgsize = _hard_limit(max_frame_bytes)
        self.socket.rcvhwm = 10_000
        self.socket.sndhwm = 10_000
        self._listen(bind)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        self._waiting = poller.poll   # (0) -> non-empty when a message is waiting

    def route(self, message_type: type[Message], handler: Handler) -> None:
        self.handlers[message_type.type_name] = handler

    def attach(self, reactor: Reactor) -> None:
        reactor.add_socket(self.socket, self.on_readable)
        if self.monitor is not None:
            reactor.add_socket(self.monitor.socket, self.monitor.on_readable)

    def on_readable(self) -> None:
        sock, waiting = self.socket, self._waiting
        for i in range(256):  # bounded, so timers still run under a flood
            # After the first message ask before reading: a zmq.Again exception costs more than the question,
            # and a poll of this one socket less than getsockopt(EVENTS), whose answer pyzmq makes an enum.
            if i and not waiting(0):
                return
            try:
                frames = _recv_frames(sock, _NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        started = time.perf_counter()
        head = frames[:2] if len(frames) > 2 and frames[1] == b"" else frames[:1]
        body = frames[len(head):]
        if len(body) != 1:
            self._fail(head, ErrorCode.UNDECODABLE, f"expected one message frame after the routing envelope, got {len(body)}")
            return
        try:
            env = decode(body[0], max_frame_bytes=self.max_frame_bytes)
        except ProtocolError as exc:
            self._fail(head, exc.code, str(exc), cid=exc.msg_id, detail=exc.detail)
            return
        type_name = env.message.type_name
        self.metrics.message(type_name, "in")
        cached = self._replies.get(env.id)
        if cached is not None:
            self.metrics.duplicates.inc()
            self.metrics.message("cached_reply", "out")
            _send_frames(self.socket, head + [cached])
            return
        pending = self._inflight.get(env.id)
        if pending is not None:  # a retry of a request still being worked on: answer both when done
            self.metrics.duplicates.inc()
            pending._heads.append(head)
            return
        handler = self.handlers.get(type_name)
        try:
            if handler is None:
                raise MeshError(ErrorCode.NO_HANDLER, f"agent {self.sender!r} does not handle {type_name}",
                                {"handles": sorted(self.handlers)})
            if self.draining and type(env.message) is not Ping:
                raise MeshError(ErrorCode.DRAINING, f"agent {self.sender!r} is draining; try again after its restart")
            reply = handler(env.message, env)
        except MeshError as exc:
            self._fail(head, exc.code, exc.message, cid=env.id, detail=exc.detail)
            return
        except Exception as exc:
            log.exception("handler for %s failed", type_name)
            self._fail(head, ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}", cid=env.id)
            return
        if isinstance(reply, Deferred):
            self._inflight[env.id] = reply
            reply._bind(self, head, env.id, type_name, started)
            return
        self._reply(head, env.id, type_name, reply, started)

    def _reply(self, head: list[bytes], msg_id: bytes, type_name: str, reply: Message, started: float) -> None:
        _, frame = encode(reply, sender=self.sender, cid=msg_id)
        self._remember(msg_id, frame)
        try:
            _send_frames(self.socket, head + [frame], _NOBLOCK)
        except zmq.Again:
            log.warning("reply to %s dropped: the client's queue is full", type_name)
            return
        self.metrics.message(reply.type_name, "out")
        self.metrics.latency(type_name, "server", time.perf_counter() - started)

    def _remember(self, msg_id: bytes, frame: bytes) -> None:
        self._replies[msg_id] = frame
        if len(self._replies) > self._reply_cache:
            self._replies.popitem(last=False)

    def _fail(self, head: list[bytes], code: str, message: str, *, cid: bytes = b"", detail: dict | None = None) -> None:
        self.metrics.error(str(code))
        self.metrics.message(Error.type_name, "out")
        log.info("rejected request: %s: %s", code, message[:300])
        _, frame = encode(Error(code=str(code), message=message, detail=detail or {}), sender=self.sender, cid=cid)
        if cid:
            self._remember(cid, frame)
        try:
            self.socket.send_multipart(head + [frame], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone; nothing to answer

def _raise_if_error(env: Envelope) -> Message:
    msg = env.message
    if isinstance(msg, Error):
        raise MeshError(msg.code, msg.message, msg.detail)
    return msg


class RpcClient:
    """Blocking Lazy Pirate client. Not thread-safe: one per thread."""

    def __init__(self, endpoint: str, *, sender: str = "client", timeout: float = 2.0, retries: int = 2,
                 ctx: zmq.Context | None = None, guard: Guard | None = None, identity: CurveIdentity | None = None,
                 server_host: str | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 metrics: MeshMetrics | None = None):
        """Pass `ctx` and `guard` to share an agent's context, or `identity` (or nothing) to get a
        context of the client's own, closed with it."""
        self.endpoint = endpoint
        self.sender = sender
        self.timeout = timeout
        self.retries = retries
        self.max_frame_bytes = max_frame_bytes
        self.metrics = metrics
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.guard = guard or Guard(self.ctx, identity)
        self.server_host = server_host
        self.socket = self._open()

    def _open(self) -> zmq.Socket:
        try:
            sock = client_socket(self.ctx, zmq.REQ, self.endpoint, guard=self.guard, server_host=self.server_host,
                                 max_frame_bytes=self.max_frame_bytes)
        except Exception:
            if self._own_ctx:
                self.guard.close()
                self.ctx.term()
            raise
        self._poller = zmq.Poller()  # Socket.poll() would build a new Poller on every request
        self._poller.register(sock, zmq.POLLIN)
        self._rcvtimeo: int | None = None   # the socket's ZMQ_RCVTIMEO (ms), set when a request's timeout differs
        return sock

    def _reset(self) -> None:
        self.socket.close(linger=0)
        self.socket = self._open()

    def request(self, message: Message, *, timeout: float | None = None, retries: int | None = None) -> Message:
        """Sends `message` and returns the reply; raises MeshError for a typed error reply or a
        garbled one (the codec's code: `undecodable`, `too_large`, ...; never a ProtocolError), and
        RequestTimeout when no reply came after every attempt. `mesh_request_retries_total` counts
        the resends (at most `retries`)."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        msg_id, frame = encode(message, sender=self.sender)
        started = time.perf_counter()
        for attempt in range(retries + 1):
            if attempt and self.metrics is not None:
                self.metrics.retries.inc()
            # A blocking recv under ZMQ_RCVTIMEO, not poll() then recv(): one wait instead of a poll, an
            # EVENTS check and a wait, and no Python poller round (several us of a round trip).
            sock = self.socket
            ms = int(timeout * 1000)   # as Poller.poll: a float rounds down, a negative one waits for ever
            if ms < 0:
                ms = -1
            if ms != self._rcvtimeo:
                sock.setsockopt(_RCVTIMEO, ms)
                # the send waits too while no connection is up (a CURVE handshake that keeps failing on a wrong
                # key): under the same limit, so a request never blocks its caller (and Ctrl-C) for ever
                sock.setsockopt(_SNDTIMEO, ms)
                self._rcvtimeo = ms
            try:
                _send(sock, frame, 0)
                frames = _recv_frames(sock)
            except zmq.Again:
                frames = None
            if frames is not None:
                env = self._receive(frames)
                if env.cid != msg_id and not (isinstance(env.message, Error) and env.cid == b""):
                    raise MeshError(ErrorCode.UNDECODABLE, "reply does not answer this request (correlation id differs)")
                if self.metrics is not None:
                    self.metrics.latency(message.type_name, "client", time.perf_counter() - started)
                return _raise_if_error(env)
            self._reset()
            log.debug("no reply from %s within %.2fs (attempt %d of %d)", self.endpoint, timeout, attempt + 1, retries + 1)
        raise RequestTimeout(f"no reply from {self.endpoint} after {retries + 1} attempt(s) of {timeout:g}s "
                             f"(is the agent running and the address right?)")

    def _receive(self, frames: list[bytes]) -> Envelope:
        """The reply's envelope; MeshError (with the codec's code) when it is garbled."""
        try:
            if len(frames) != 1:
                raise ProtocolError(f"expected a reply of one frame, got {len(frames)}")
            return decode(frames[0], max_frame_bytes=self.max_frame_bytes)
        except ProtocolError as exc:
            if self.metrics is not None:
                self.metrics.error(str(exc.code))
            raise MeshError(exc.code, f"garbled reply: {exc}", exc.detail) from None

    def send_raw(self, frames: list[bytes], *, timeout: float | None = None) -> bytes | None:
        """Sends arbitrary frames and returns the raw reply (not decoded: the caller checks it), or None
        on timeout. For probes and fuzzing."""
        self.socket.send_multipart(frames)
        if self._poller.poll((self.timeout if timeout is None else timeout) * 1000):
            return self.socket.recv()
        self._reset()
        return None

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_ctx:
            self.guard.close()
            self.ctx.term()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Pending:
    frame: bytes
    type_name: str
    on_reply: Callable[[Message], None]
    on_failure: Callable[[MeshError], None]
    timeout: float
    retries: int
    attempts: int
    started: float
    deadline: float = 0.0   # when the current attempt has had its `timeout` (time.monotonic())
    mark: int = 0           # the Peer's count of frames received when this frame was last sent


_COALESCE_S = 0.02  # requests due within this much (at most a tenth of their timeout) are retried together


class Peer:
    """Non-blocking Lazy Pirate client on a reactor: replies and failures arrive as callbacks.

    Each request has its own deadline and attempt count: an attempt is a send of its frame that
    starts `timeout` seconds of waiting. When that deadline passes without a reply the request is
    sent again (the next attempt, counted in `mesh_request_retries_total`), or after `retries + 1`
    attempts it fails with RequestTimeout; either way `(retries + 1) x timeout` after `request()`
    at the latest, however many other requests wait on the same peer. One reactor timer, due at
    the earliest deadline, finds the requests that are due (a scan of the pending ones per expiry,
    nothing per message); requests due within `_COALESCE_S` of each other are retried together.

    The socket (DEALER) is closed and opened again when a request times out and nothing at all
    came back on it since that request was sent (the connection may be dead or stuck); if replies
    do come back, the connection works and only the due requests are resent on it. A fresh socket
    has lost the old one's queued frames and the replies still on their way, so every other pending
    request is sent again on it under its own id (the server answers repeats from its reply cache,
    or once when a deferred reply is ready). That carry-over is not an attempt of theirs: it does
    not move their deadlines, does not count toward their retries and is not counted in
    `mesh_request_retries_total`.

    A reply frame that cannot be decoded is counted (`mesh_errors_total{code}`) and logged, and
    dropped: its correlation id is unreadable, so it cannot fail a request; the request it
    answered is retried or times out as above."""

    def __init__(self, ctx: zmq.Context, reactor: Reactor, endpoint: str, *, sender: str, metrics: MeshMetrics,
                 guard: Guard | None = None, server_host: str | None = None, timeout: float = 2.0, retries: int = 2,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.ctx = ctx
        self.reactor = reactor
        self.endpoint = endpoint
        self.sender = sender
        self.metrics = metrics
        self.guard = guard or Guard(ctx, None)
        self.server_host = server_host
        self.timeout = timeout
        self.retries = retries
        self.max_frame_bytes = max_frame_bytes
        self._pending: dict[bytes, _Pending] = {}
        self._timer: Timer | None = None  # the one timer: due at (or before) the earliest deadline
        self._received = 0  # frames read from the socket (any socket of this Peer)
        self.socket = self._open()

    def _open(self) -> zmq.Socket:
        sock = client_socket(self.ctx, zmq.DEALER, self.endpoint, guard=self.guard, server_host=self.server_host,
                             max_frame_bytes=self.max_frame_bytes)
        self.reactor.add_socket(sock, self._on_readable)
        return sock

    @property
    def pending(self) -> int:
        return len(self._pending)

    def request(self, message: Message, on_reply: Callable[[Message], None],
                on_failure: Callable[[MeshError], None] | None = None, *, timeout: float | None = None,
                retries: int | None = None) -> bytes:
        msg_id, frame = encode(message, sender=self.sender)
        p = _Pending(frame=frame, type_name=message.type_name, on_reply=on_reply,
                     on_failure=on_failure or self._log_failure, timeout=self.timeout if timeout is None else timeout,
                     retries=self.retries if retries is None else retries, attempts=0, started=time.perf_counter())
        self._pending[msg_id] = p
        self._attempt(p, time.monotonic())
        self._arm(p.deadline)
        self.metrics.message(message.type_name, "out")
        return msg_id

    def _attempt(self, p: _Pending, now: float) -> None:
        """Sends `p` as its next attempt: counted, with a new deadline."""
        p.attempts += 1
        p.deadline = now + p.timeout
        self._transmit(p)

    def _transmit(self, p: _Pending) -> None:
        p.mark = self._received
        try:
            _send_frames(self.socket, [b"", p.frame], _NOBLOCK)
        except zmq.Again:
            pass  # queue full: the deadline treats it as a lost request

    def _arm(self, when: float) -> None:
        """Makes sure the timer goes off by `when`."""
        timer = self._timer
        if timer is not None:
            if timer.when <= when:
                return
            timer.cancel()
        self._timer = self.reactor.call_later(max(0.0, when - time.monotonic()), self._expired)

    def _expired(self) -> None:
        self._timer = None
        now = time.monotonic()
        due = [(msg_id, p) for msg_id, p in self._pending.items()
               if p.deadline <= now + min(_COALESCE_S, p.timeout / 10)]
        failed: list[_Pending] = []
        if due:
            # Lazy Pirate: no frame came back since these were sent, so the connection may be dead or stuck: start
            # a fresh socket. It has lost everything queued on the old one: carry the others over (not an attempt).
            reset = any(self._received == p.mark for _, p in due)
            if reset:
                self.reactor.remove_socket(self.socket)
                self.socket.close(linger=0)
                self.socket = self._open()
            resent = set()
            for msg_id, p in due:
                if p.attempts > p.retries:
                    del self._pending[msg_id]
                    failed.append(p)
                    continue
                self.metrics.retries.inc()
                log.debug("no reply from %s to %s within %.2fs (attempt %d of %d)", self.endpoint, p.type_name,
                          p.timeout, p.attempts, p.retries + 1)
                self._attempt(p, now)
                resent.add(msg_id)
            if reset:
                for msg_id, p in self._pending.items():
                    if msg_id not in resent:
                        self._transmit(p)
        if self._pending:
            self._arm(min(p.deadline for p in self._pending.values()))
        for p in failed:   # last: a callback may send new requests, or close the Peer
            self.metrics.error("timeout")
            p.on_failure(RequestTimeout(f"no reply from {self.endpoint} to {p.type_name} after {p.attempts} attempt(s) "
                                        f"of {p.timeout:g}s"))

    def _on_readable(self) -> None:
        for _ in range(256):
            try:
                frames = _recv_frames(self.socket, _NOBLOCK)
            except zmq.Again:
                return
            self._received += 1
            try:
                env = decode(frames[-1], max_frame_bytes=self.max_frame_bytes)
            except ProtocolError as exc:  # no readable cid: see the class docstring
                self.metrics.error(str(exc.code))
                log.warning("garbled reply from %s (dropped): %s: %s", self.endpoint, exc.code, exc)
                continue
            p = self._pending.pop(env.cid, None)
            if p is None:
                continue  # a late answer to a request already retried and answered, or failed
            self.metrics.message(env.message.type_name, "in")
            self.metrics.latency(p.type_name, "client", time.perf_counter() - p.started)
            try:
                msg = _raise_if_error(env)
            except MeshError as exc:
                p.on_failure(exc)
                continue
            p.on_reply(msg)

    def fail_pending(self, exc: MeshError) -> int:
        """Fails every request still waiting for a reply, at once, with `exc`: for a caller that knows the server lost
        them (the twin saw it die or restart), rather than waiting for each one's timeout. Replies that still come
        to them are dropped. Returns how many were failed."""
        pending, self._pending = self._pending, {}
        self._disarm()
        for p in pending.values():   # a callback may send new requests: they are not among these
            p.on_failure(exc)
        return len(pending)

    def _log_failure(self, exc: MeshError) -> None:
        log.warning("request to %s failed: %s", self.endpoint, exc)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._disarm()
        self._pending.clear()
        self.reactor.remove_socket(self.socket)
        self.socket.close(linger=0)
