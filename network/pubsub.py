"""Publish/subscribe for events: two frames, [topic, message frame].

The topic is UTF-8 text, by default the message's type name (`twin.state`), so subscribing to
a prefix such as `twin.` selects a family of events. A subscriber drops and counts frames it
cannot decode; it never raises into its agent.
"""

from __future__ import annotations

import logging
from typing import Callable

import zmq

from network.codec import DEFAULT_MAX_FRAME_BYTES, Envelope, ProtocolError, decode, encode
from network.messages import ErrorCode, Message
from network.metrics import MeshMetrics
from network.rpc import BoundSocket, _hard_limit
from network.security import Guard

log = logging.getLogger(__name__)

_SNDMORE = int(zmq.SNDMORE)  # a plain int: pyzmq's send_multipart spends ~1 us a message on checks and enum flags


class Publisher(BoundSocket):
    what = "subscriber"

    def __init__(self, ctx: zmq.Context, bind: str, *, sender: str, metrics: MeshMetrics, guard: Guard | None = None,
                 sndhwm: int = 100_000):
        self.sender = sender
        self._bind(ctx, zmq.PUB, guard, metrics)
        self.socket.sndhwm = sndhwm
        self._listen(bind)

    def attach(self, reactor) -> None:
        if self.monitor is not None:
            reactor.add_socket(self.monitor.socket, self.monitor.on_readable)

    def publish(self, message: Message, topic: str | None = None) -> None:
        _, frame = encode(message, sender=self.sender)
        send = self.socket.send
        send((topic or message.type_name).encode(), _SNDMORE)
        send(frame)
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

    def connect(self, endpoint: str, server_host: str | None = None) -> None:
        # CURVE options are per socket: one subscriber socket per server host when CURVE is on.
        if self.guard.enabled:
            if self._guarded and self._server_host != server_host:
                raise ValueError("a CURVE subscriber connects to one host; make one Subscriber per host")
            self.guard.client(self.socket, server_host or "")
            self._guarded, self._server_host = True, server_host
        self.socket.connect(endpoint)

    def subscribe(self, prefix: str = "") -> None:
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    def attach(self, reactor) -> None:
        reactor.add_socket(self.socket, self.on_readable)

    def on_readable(self, limit: int = 1000) -> int:
        handled = 0
        for _ in range(limit):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
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
        self.socket.close(linger=0)
