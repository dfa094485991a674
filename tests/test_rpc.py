"""Request/reply and pub/sub on real ZeroMQ sockets over loopback TCP."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from mesh.messages import StateChanged
from network.codec import decode, encode
from network.messages import Echo, Error, Ping
from network.metrics import MeshMetrics
from network.pubsub import Publisher, Subscriber
from network.reactor import Reactor
from network.rpc import MeshError, Peer, RequestTimeout, RpcClient, RpcServer
from testing.harness import GarbledServer, free_port_block, wait_for


class ServerThread:
    """An RpcServer on its own reactor thread, with an Echo handler that counts its calls."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", *, max_frame_bytes: int = 1 << 20, slow_s: float = 0.0):
        self.ctx = zmq.Context()
        self.metrics = MeshMetrics("srv", "test")
        self.reactor = Reactor(max_wait=0.02)
        self.server = RpcServer(self.ctx, endpoint, sender="srv", metrics=self.metrics, max_frame_bytes=max_frame_bytes)
        self.calls = 0
        self.slow_s = slow_s
        self.server.route(Echo, self._echo)
        self.server.route(Ping, self._boom)
        self.server.attach(self.reactor)
        self.thread = threading.Thread(target=self.reactor.run, daemon=True)
        self.thread.start()

    def _echo(self, msg, env):
        self.calls += 1
        if self.slow_s:
            time.sleep(self.slow_s)
        return msg

    def _boom(self, msg, env):
        raise RuntimeError("handler bug")

    def close(self):
        self.reactor.stop()
        self.thread.join(2)
        self.server.close()
        self.ctx.term()


@pytest.fixture
def server():
    s = ServerThread()
    yield s
    s.close()


def test_request_reply(server):
    with RpcClient(server.server.endpoint) as c:
        reply = c.request(Echo(payload=b"abc", seq=4))
    assert reply == Echo(payload=b"abc", seq=4)
    assert server.metrics.sample("mesh_messages_total", {"type": "mesh.echo", "direction": "in"}) == 1
    assert server.metrics.sample("mesh_request_latency_seconds_count", {"type": "mesh.echo", "side": "server"}) == 1


def test_handler_errors_become_typed_errors_and_the_server_keeps_serving(server):
    with RpcClient(server.server.endpoint) as c:
        with pytest.raises(MeshError) as info:
            c.request(Ping())
        assert info.value.code == "handler_error" and "handler bug" in info.value.message
        assert c.request(Echo(seq=1)).seq == 1


def test_unhandled_type_is_answered_no_handler(server):
    with RpcClient(server.server.endpoint) as c, pytest.raises(MeshError) as info:
        c.request(StateChanged(agent="a", host="h", previous="ready", state="dead"))
    assert info.value.code == "no_handler" and "mesh.echo" in info.value.detail["handles"]


@pytest.mark.parametrize("frames, code", [
    ([b"not msgpack \xc1"], "undecodable"),
    ([msgpack.packb([1, "what.ever", 1, b"i" * 16, b"", "x", 1.0, {}])], "unknown_type"),
    ([msgpack.packb([1, "mesh.echo", 7, b"i" * 16, b"", "x", 1.0, {}])], "bad_version"),
    ([msgpack.packb([1, "mesh.echo", 1, b"i" * 16, b"", "x", 1.0, {"seq": [1]}])], "invalid_body"),
    ([b"a", b"b"], "undecodable"),
])
def test_bad_frames_get_typed_errors(server, frames, code):
    with RpcClient(server.server.endpoint) as c:
        raw = c.send_raw(frames)
        err = decode(raw).message
        assert isinstance(err, Error) and err.code == code, err
        assert c.request(Echo(seq=2)).seq == 2  # still serving
    assert server.metrics.sample("mesh_errors_total", {"code": code}) >= 1


def test_error_reply_carries_the_request_id_when_readable(server):
    with RpcClient(server.server.endpoint) as c:
        raw = c.send_raw([msgpack.packb([1, "what.ever", 1, b"q" * 16, b"", "x", 1.0, {}])])
    assert decode(raw).cid == b"q" * 16


def test_oversized_frames_get_too_large():
    s = ServerThread(max_frame_bytes=4096)
    try:
        with RpcClient(s.server.endpoint, max_frame_bytes=4096) as c:
            with pytest.raises(MeshError) as info:
                c.request(Echo(payload=b"x" * 10_000))
            assert info.value.code == "too_large" and info.value.detail["limit"] == 4096
            # far beyond the hard limit ZeroMQ drops the connection; the server lives on
            assert c.send_raw([b"x" * (5 << 20)], timeout=0.5) is None
            assert c.request(Echo(seq=3)).seq == 3
    finally:
        s.close()


def test_retried_request_is_handled_once(server):
    _, frame = encode(Echo(seq=11), sender="retrier")
    with RpcClient(server.server.endpoint) as c:
        first = c.send_raw([frame])
        second = c.send_raw([frame])
    assert first == second
    assert server.calls == 1
    assert server.metrics.sample("mesh_duplicate_requests_total") == 1


def test_lazy_pirate_retries_until_the_server_comes_up():
    port = free_port_block(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    started = {}

    def late_start():
        time.sleep(0.7)
        started["server"] = ServerThread(endpoint)

    threading.Thread(target=late_start).start()
    try:
        with RpcClient(endpoint, timeout=0.3, retries=10) as c:
            t0 = time.monotonic()
            assert c.request(Echo(seq=5)).seq == 5
            assert time.monotonic() - t0 >= 0.6
    finally:
        wait_for(lambda: "server" in started, what="late server")
        started["server"].close()


def test_timeout_after_bounded_retries():
    endpoint = f"tcp://127.0.0.1:{free_port_block(1)}"
    with RpcClient(endpoint, timeout=0.1, retries=2) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="after 3 attempt"):
            c.request(Echo())
        assert 0.25 < time.monotonic() - t0 < 2.0


def test_slow_server_retry_is_not_handled_twice():
    s = ServerThread(slow_s=0.3)
    try:
        with RpcClient(s.server.endpoint, timeout=0.2, retries=3) as c:
            assert c.request(Echo(seq=8)).seq == 8
        time.sleep(0.4)
        assert s.calls == 1  # the resent frame hit the reply cache
    finally:
        s.close()


def test_many_concurrent_clients(server):
    errors = []

    def client(i):
        try:
            with RpcClient(server.server.endpoint, timeout=5) as c:
                for j in range(50):
                    assert c.request(Echo(seq=i * 1000 + j, payload=bytes([i]))).seq == i * 1000 + j
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert server.calls == 1000


def test_peer_is_non_blocking_and_recovers(server):
    ctx = zmq.Context()
    reactor = Reactor(max_wait=0.01)
    metrics = MeshMetrics("cli", "test")
    peer = Peer(ctx, reactor, server.server.endpoint, sender="cli", metrics=metrics, timeout=0.5, retries=1)
    got, failed = [], []
    for i in range(10):
        peer.request(Echo(seq=i), lambda m: got.append(m.seq), failed.append)
    peer.request(Ping(), got.append, lambda e: failed.append(e.code))
    deadline = time.monotonic() + 5
    while len(got) + len(failed) < 11 and time.monotonic() < deadline:
        reactor.run_once()
    assert sorted(got) == list(range(10)) and failed == ["handler_error"]
    dead = Peer(ctx, reactor, f"tcp://127.0.0.1:{free_port_block(1)}", sender="cli", metrics=metrics, timeout=0.1, retries=1)
    dead.request(Echo(), got.append, failed.append)
    deadline = time.monotonic() + 3
    while len(failed) < 2 and time.monotonic() < deadline:
        reactor.run_once()
    assert isinstance(failed[1], RequestTimeout)
    assert metrics.sample("mesh_request_retries_total") >= 1
    peer.close()
    dead.close()
    ctx.term()


def test_peer_fail_pending_fails_the_waiting_requests_at_once_and_drops_late_replies():
    """What a caller does when it learns the server lost its requests (the twin saw it die): each waiting request
    fails now with the given error, not after its timeout; a reply that still comes is dropped; new requests work."""
    ctx = zmq.Context()
    reactor = Reactor(max_wait=0.01)
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    peer = Peer(ctx, reactor, f"tcp://127.0.0.1:{port}", sender="cli", metrics=MeshMetrics("cli", "test"),
                timeout=60.0, retries=0)
    got, failed = [], []
    for i in range(3):
        peer.request(Echo(seq=i), lambda m: got.append(m.seq), failed.append)
    held = []
    while len(held) < 3:
        assert router.poll(5000), "the requests did not arrive"
        held.append(router.recv_multipart())
    assert peer.fail_pending(MeshError("peer_lost", "the server died")) == 3
    assert [(e.code, e.message) for e in failed] == [("peer_lost", "the server died")] * 3 and peer.pending == 0
    assert peer.fail_pending(MeshError("peer_lost", "again")) == 0
    for ident, empty, frame in held:   # the late replies, then one to a new request
        env = decode(frame)
        router.send_multipart([ident, empty, encode(env.message, sender="srv", cid=env.id)[1]])
    peer.request(Echo(seq=7), lambda m: got.append(m.seq), failed.append)
    assert router.poll(5000)
    ident, empty, frame = router.recv_multipart()
    router.send_multipart([ident, empty, encode(decode(frame).message, sender="srv", cid=decode(frame).id)[1]])
    wait_for(lambda: reactor.run_once() or got, timeout=5, what="the reply to the new request")
    assert got == [7] and len(failed) == 3
    peer.close()
    router.close(linger=0)
    ctx.term()


def _silent_router(ctx):
    """A bound ROUTER that never answers: a peer that is up (TCP connects) and silent."""
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    return router, f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"


def _run_until(reactor, done, limit):
    deadline = time.monotonic() + limit
    while not done() and time.monotonic() < deadline:
        reactor.run_once()


def test_peer_requests_to_a_silent_peer_each_fail_after_their_own_attempts():
    """A full hand-off window (16) to a silent peer: every request fails after (retries + 1) x timeout, not one per
    period (the old Peer resent all the others on each timeout and re-armed their timers: the last failed after
    about 16 x 3 x 0.3 s), and only the real resends are counted: 16 x retries."""
    ctx = zmq.Context()
    reactor = Reactor(max_wait=0.01)
    router, endpoint = _silent_router(ctx)
    metrics = MeshMetrics("cli", "test")
    timeout, retries = 0.3, 2
    peer = Peer(ctx, reactor, endpoint, sender="cli", metrics=metrics, timeout=timeout, retries=retries)
    failed = {}
    t0 = time.monotonic()
    for i in range(16):
        peer.request(Echo(seq=i), lambda m: None, lambda e, i=i: failed.setdefault(i, (e, time.monotonic() - t0)))
    _run_until(reactor, lambda: len(failed) == 16, (retries + 1) * timeout + 3.0)
    assert sorted(failed) == list(range(16)), f"{len(failed)} of 16 failed in time"
    assert all(isinstance(e, RequestTimeout) and "after 3 attempt(s)" in str(e) for e, _ in failed.values())
    took = max(t for _, t in failed.values())
    assert (retries + 1) * timeout - 0.05 <= took <= (retries + 1) * timeout + 0.5, took
    assert metrics.sample("mesh_request_retries_total") == 16 * retries
    assert metrics.sample("mesh_errors_total", {"code": "timeout"}) == 16
    assert peer.pending == 0
    peer.close()
    router.close()
    ctx.term()


def test_peer_resend_for_one_request_is_not_an_attempt_of_the_others():
    """Requests sent at different times to a silent peer: the socket reset for the first carries the second over to
    the new socket, but does not move its deadline or use up its retries."""
    ctx = zmq.Context()
    reactor = Reactor(max_wait=0.01)
    router, endpoint = _silent_router(ctx)
    metrics = MeshMetrics("cli", "test")
    peer = Peer(ctx, reactor, endpoint, sender="cli", metrics=metrics, timeout=0.3, retries=1)
    failed = {}
    t0 = time.monotonic()
    peer.request(Echo(seq=0), lambda m: None, lambda e: failed.setdefault(0, time.monotonic() - t0))
    _run_until(reactor, lambda: False, 0.15)
    t1 = time.monotonic()
    peer.request(Echo(seq=1), lambda m: None, lambda e: failed.setdefault(1, time.monotonic() - t1))
    _run_until(reactor, lambda: len(failed) == 2, 3.0)
    assert 0.55 <= failed[0] <= 0.9 and 0.55 <= failed[1] <= 0.9, failed
    assert metrics.sample("mesh_request_retries_total") == 2
    peer.close()
    router.close()
    ctx.term()


@pytest.mark.parametrize("reply, code", [
    ([b"\xc1 not msgpack"], "undecodable"),
    ([msgpack.packb([1, 2, 3])], "undecodable"),
    ([b"one", b"two"], "undecodable"),
    ([b"x" * 5000], "too_large"),
], ids=["not-msgpack", "not-an-envelope", "two-frames", "too-large"])
def test_client_turns_a_garbled_reply_into_a_mesh_error(reply, code):
    metrics = MeshMetrics("cli", "test")
    with GarbledServer("tcp://127.0.0.1:*", reply) as srv:
        with RpcClient(srv.endpoint, timeout=2, retries=0, max_frame_bytes=4096, metrics=metrics) as c:
            with pytest.raises(MeshError) as info:
                c.request(Echo(seq=1))
            assert info.value.code == code and "garbled reply" in info.value.message
            assert not isinstance(info.value, RequestTimeout)
            with pytest.raises(MeshError):   # the socket is still usable: a second request gets its answer too
                c.request(Echo(seq=2))
        assert srv.requests == 2
    assert metrics.sample("mesh_errors_total", {"code": code}) == 2


def test_client_counts_only_real_resends():
    metrics = MeshMetrics("cli", "test")
    with RpcClient(f"tcp://127.0.0.1:{free_port_block(1)}", timeout=0.05, retries=2, metrics=metrics) as c:
        with pytest.raises(RequestTimeout):
            c.request(Echo())
    assert metrics.sample("mesh_request_retries_total") == 2


def test_pubsub_topics_and_prefixes():
    ctx = zmq.Context()
    m_pub, m_sub = MeshMetrics("pub", "t"), MeshMetrics("sub", "t")
    pub = Publisher(ctx, "tcp://127.0.0.1:*", sender="pub", metrics=m_pub)
    got = []
    sub = Subscriber(ctx, lambda topic, env: got.append((topic, env.message.seq, env.sender)), metrics=m_sub)
    sub.connect(pub.endpoint)
    sub.subscribe("echo.a")
    wait_for(lambda: (pub.publish(Echo(seq=-1), topic="echo.a.sync"), sub.on_readable())[1], what="subscription")
    time.sleep(0.1)
    sub.on_readable()
    got.clear()
    for i in range(100):
        pub.publish(Echo(seq=i), topic="echo.a" if i % 2 else "echo.b")
    pub.socket.send_multipart([b"echo.a", b"\xc1garbage"])
    pub.socket.send_multipart([b"echo.a"])
    pub.socket.send_multipart([b"echo.a", encode(Echo(seq=-5), sender="x")[1][:-3]])
    wait_for(lambda: sub.on_readable() == 0 and len(got) >= 50, what="events")
    assert [s for _, s, _ in got] == list(range(1, 100, 2))
    assert all(t == "echo.a" and sender == "pub" for t, _, sender in got)
    assert m_sub.sample("mesh_pubsub_dropped_total", {"code": "undecodable"}) == 3
    sub.close()
    pub.close()
    ctx.term()


def test_deferred_reply_from_a_worker_thread_and_a_retry_answered_once():
    """A handler hands its work to another thread and returns Deferred; the reply comes later through
    call_soon_threadsafe. A Lazy Pirate retry that arrives meanwhile is not handled again: both copies
    get the one reply (the client takes the first)."""
    from network.rpc import Deferred

    ctx = zmq.Context()
    reactor = Reactor(max_wait=0.02)
    server = RpcServer(ctx, "tcp://127.0.0.1:*", sender="srv", metrics=MeshMetrics("srv", "test"))
    calls = []

    def later(msg, env):
        calls.append(msg.seq)
        d = Deferred()
        if msg.seq == 13:
            threading.Timer(0.2, lambda: reactor.call_soon_threadsafe(lambda: d.fail("store_unavailable", "down"))).start()
        else:
            threading.Timer(1.2, lambda: reactor.call_soon_threadsafe(lambda: d.resolve(Echo(seq=msg.seq * 2)))).start()
        return d

    server.route(Echo, later)
    server.attach(reactor)
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    try:
        with RpcClient(server.endpoint, timeout=0.5, retries=3) as c:
            started = time.monotonic()
            reply = c.request(Echo(seq=21))      # the first attempt times out; a retry arrives while it is pending
            assert reply.seq == 42 and time.monotonic() - started >= 1.0
            with pytest.raises(MeshError) as exc:
                c.request(Echo(seq=13))
            assert exc.value.code == "store_unavailable"
        assert calls == [21, 13]                 # handled once each, retries included
        assert server.metrics.duplicates._value.get() >= 1
    finally:
        reactor.stop()
        thread.join(2)
        server.close()
        reactor.close()
        ctx.term()
