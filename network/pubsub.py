"""Publish/subscribe for events: two frames, [topic, message frame].

The topic is UTF-8 text, by default the message's type name (`twin.state`), so subscribing to
a prefix such as `twin.` selects a family of events. A subscriber drops and counts frames it
cannot decode; it never raises into its agent.

A message over the hard limit (ZMQ_MAXMSGSIZE) is a protocol error to libzmq: it drops the
connection and, unlike after a network error, never reconnects, so one oversized event would cut
a subscriber off from that publisher for good. An attached Subscriber watches its socket and
connects again when libzmq does not (counted as a dropped message, code `connection_dropped`).
"""

from __future__ import annotations

import logging
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from network.codec import DEFAULT_MAX_FRAME_BYTES, Envelope, ProtocolError, decode, encode
from network.messages import ErrorCode, Message
from network.metrics import MeshMetrics
from network.rpc import BoundSocket, _hard_limit, _recv_frames, _send
from network.security import Guard

log = logging.getLogger(__name__)

_SNDMORE = int(zmq.SNDMORE)  # a plain int: pyzmq's send_multipart spends ~1 us a message on checks and enum flags
_NOBLOCK = int(zmq.NOBLOCK)
# A PUB socket only ever receives subscriptions (a topic prefix each). Without a cap, libzmq reads a
# subscription of any size into memory and keeps it in the socket's subscription trie.
MAX_SUBSCRIPTION_BYTES = 4096
RECONNECT_CHECK_S = 0.5   # after a disconnect, libzmq says within this time whether it reconnects by itself
RECONNECT_MAX_S = 30.0    # ceiling of the backoff while the connection keeps being dropped before a handshake
_LINK_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class Publisher(BoundSocket):
    what = "subscriber"

    def __init__(self, ctx: zmq.Context, bind: str, *, sender: str, metrics: MeshMetrics, guard: Guard | None = None,
                 sndhwm: int = 100_000):
        self.sender = sender
        self._topics: dict[str, bytes] = {}   # topic -> its UTF-8 bytes (a few distinct topics, sent per message)
        self._bind(ctx, zmq.PUB, guard, metrics)
        self.socket.sndhwm = sndhwm
        self.socket.maxmsgsize = MAX_SUBSCRIPTION_BYTES   # a longer one drops that subscriber's connection
        self._listen(bind)

    def attach(self, reactor) -> None:
        if self.monitor is not None:
            reactor.add_socket(self.monitor.socket, self.monitor.on_readable)

    def publish(self, message: Message, topic: str | None = None) -> None:
        _, frame = encode(message, sender=self.sender)
        topic = topic or message.type_name
        topic_bytes = self._topics.get(topic)
        if topic_bytes is None:
            topic_bytes = topic.encode()
            if len(self._topics) < 1024:   # per-message topics (`echo.<seq>`) are encoded each time
                self._topics[topic] = topic_bytes
        sock = self.socket
        _send(sock, topic_bytes, _SNDMORE)
        _send(sock, frame, 0)
        self.metrics.message(message.type_name, "out")

class Subscriber:
    def __init__(self, ctx: zmq.Context, on_message: Callable[[str, Envelope], None], *, metrics: MeshMetrics,
                 guard: Guard | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, rcvhwm: int = 100_000):
        self.on_message = on_message
        self.metrics = metrics
        self.guard = guard or Guard(ctx, None)
        self.max_frame_bytes = max_frame_bytes
        self.socket = ctx.socket(zmq.SUB)
        self.socket.linger = 0
        self.socket.rcvhwm = rcvhwm
        self.socket.maxmsgsize = _hard_limit(max_frame_bytes)
        self._guarded = False
        self._server_host: str | None = None
        self._endpoints: set[str] = set()
        self._down: dict[str, int] = {}     # endpoint -> mark of its last disconnect not followed by a reconnect
        self._marks = 0
        self._drops: dict[str, int] = {}    # endpoint -> drops since its last successful handshake (backoff)
        self._monitor: zmq.Socket | None = None
        self._reactor = None

    def connect(self, endpoint: str, server_host: str | None = None) -> None:
        # CURVE options are per socket: one subscriber socket per server host when CURVE is on.
        if self.guard.enabled:
            if self._guarded and self._server_host != server_host:
                raise ValueError("a CURVE subscriber connects to one host; make one Subscriber per host")
            self.guard.client(self.socket, server_host or "")
            self._guarded, self._server_host = True, server_host
        self.socket.connect(endpoint)
        self._endpoints.add(endpoint)

    def subscribe(self, prefix: str = "") -> None:
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    def attach(self, reactor) -> None:
        reactor.add_socket(self.socket, self.on_readable)
        self._reactor = reactor
        self._monitor = self.socket.get_monitor_socket(events=_LINK_EVENTS)
        reactor.add_socket(self._monitor, self._on_link_event)

    def _on_link_event(self) -> None:
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            endpoint = event["endpoint"].decode(errors="replace")
            if endpoint not in self._endpoints:
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._marks += 1
                self._down[endpoint] = mark = self._marks
                self._reactor.call_later(RECONNECT_CHECK_S, lambda: self._reconnect_if_dropped(endpoint, mark))
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._drops.pop(endpoint, None)
            else:   # libzmq is (re)connecting by itself
                self._down.pop(endpoint, None)

    def _reconnect_if_dropped(self, endpoint: str, mark: int) -> None:
        if self._down.get(endpoint) != mark or self.socket.closed:
            return
        del self._down[endpoint]
        drops = self._drops[endpoint] = self._drops.get(endpoint, 0) + 1
        self._drop("connection_dropped", f"libzmq dropped the connection to {endpoint} for good (a message over "
                                         f"{self.socket.maxmsgsize} bytes, broken framing, a refused handshake)")
        # at once after a drop that followed a good handshake; backing off while handshakes fail (wrong keys)
        delay = 0.0 if drops == 1 else min(RECONNECT_CHECK_S * 2 ** (drops - 1), RECONNECT_MAX_S)
        (log.warning if drops == 1 else log.debug)(
            "connection to publisher %s dropped by libzmq (a message over the hard limit of %d bytes, or a refused "
            "handshake); connecting again in %.1f s", endpoint, self.socket.maxmsgsize, delay)
        self._reactor.call_later(delay, lambda: self._connect_again(endpoint))

    def _connect_again(self, endpoint: str) -> None:
        if self.socket.closed:
            return
        try:
            self.socket.disconnect(endpoint)
        except zmq.ZMQError:
            pass
        self.socket.connect(endpoint)

    def on_readable(self, limit: int = 1000) -> int:
        handled = 0
        for _ in range(limit):
            try:
                frames = _recv_frames(self.socket, _NOBLOCK)
            except zmq.Again:
                break
            handled += 1
            if len(frames) != 2:
                self._drop(ErrorCode.UNDECODABLE, f"expected [topic, frame], got {len(frames)} frames")
                continue
            try:
                topic = frames[0].decode()
                env = decode(frames[1], max_frame_bytes=self.max_frame_bytes)
            except UnicodeDecodeError:
                self._drop(ErrorCode.UNDECODABLE, "topic is not UTF-8")
                continue
            except ProtocolError as exc:
                self._drop(exc.code, str(exc))
                continue
            self.metrics.message(env.message.type_name, "in")
            self.on_message(topic, env)
        return handled

    def _drop(self, code: str, why: str) -> None:
        self.metrics.dropped.labels(str(code)).inc()
        self.metrics.error(str(code))
        log.debug("dropped an event: %s", why)

    def close(self) -> None:
        if self._monitor is not None:
            if self._reactor is not None:
                self._reactor.remove_socket(self._monitor)
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self.socket.close(linger=0)
