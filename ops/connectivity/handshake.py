"""One mesh.ping on a fresh REQ socket whose ZMTP/CURVE handshake is watched through a socket
monitor: it tells "refused my key" from "no handshake" from "handshake, but no reply"."""

from __future__ import annotations

import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import parse_monitor_message

from network.codec import ProtocolError, decode, encode
from network.messages import Ping
from ops.connectivity.session import SENDER, Session

WATCHED = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass
class Attempt:
    """One mesh.ping on a fresh socket whose handshake is watched through a socket monitor."""

    outcome: str  # answered | refused_auth | handshake_failed | no_reply | no_handshake | no_connect
    ms: float
    detail: str = ""
    message: object = None  # the reply, when answered


def watched_ping(s: Session, endpoint: str, keys: tuple[bytes, bytes, bytes] | None, timeout: float) -> Attempt:
    """mesh.ping on a fresh REQ socket, watching its handshake; stops at the first refused handshake."""
    sock = s.ctx.socket(zmq.REQ)
    sock.linger = 0
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    monitor = sock.get_monitor_socket(WATCHED)
    try:
        sock.connect(endpoint)
        mid, frame = encode(Ping(), sender=SENDER)
        sock.send(frame)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        started = time.perf_counter()
        deadline = started + timeout
        connected = handshake = False
        while (left := deadline - time.perf_counter()) > 0:
            ready = dict(poller.poll(left * 1000))
            if sock in ready:
                took = time.perf_counter() - started
                try:
                    env = decode(sock.recv())
                except ProtocolError as exc:
                    return Attempt("no_reply", took, f"undecodable reply: {exc}")
                ok = env.cid == mid
                return Attempt("answered" if ok else "no_reply", took, env.type_name, env.message)
            if monitor in ready:
                event = parse_monitor_message(monitor.recv_multipart())
                kind = event["event"]
                took = time.perf_counter() - started
                if kind == zmq.EVENT_CONNECTED:
                    connected = True
                elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    handshake = True
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return Attempt("refused_auth", took, f"ZAP status {int(event['value'])}")
                else:
                    name = "protocol error" if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else "connection dropped"
                    return Attempt("handshake_failed", took, name)
        outcome = "no_reply" if handshake else "no_handshake" if connected else "no_connect"
        return Attempt(outcome, timeout)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
