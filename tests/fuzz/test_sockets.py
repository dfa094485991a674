"""Bad input at every socket an agent binds, on real agent processes (`meshctl up`).

An agent binds three ports: rpc (ZeroMQ ROUTER), pub (ZeroMQ PUB) and metrics (HTTP). It also takes input
from every PUB it subscribes to, through its own SUB socket. Each test attacks one of them, then checks:

* no agent crashed or restarted, and each still answers a valid Ping (`Mesh.assert_alive`);
* every rejection the agent can see is counted: `mesh_errors_total{code}` (and `mesh_pubsub_dropped_total`,
  `mesh_auth_refused_total`) grow by exactly the number of frames refused, per code;
* frames over the hard limit (ZMQ_MAXMSGSIZE) are refused without being read into memory: the agent's peak
  resident memory (VmHWM) does not grow by the frame's size.

What libzmq refuses below the agent (a frame over the hard limit, bytes that are not ZMTP, a subscription
message a PUB does not understand) reaches no counter: libzmq reports at most a disconnect, the same event as
a client that leaves. Those tests check survival and memory, and print what was sent.

FUZZ_EXAMPLES (default 2000) sets the random examples per socket.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections import Counter

import pytest
import zmq
import zmq.utils.monitor
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.probe import ProbeReport, ProbeWatch
from mesh.messages import StatusRequest
from network.codec import decode, encode
from network.messages import Echo, Error, Ping
from network.security import load_identity
from testing.harness import wait_for
from tests.fuzz.conftest import (
    HARD_LIMIT,
    MAX_FRAME,
    by_label,
    dealer,
    delta,
    proc_status,
    scrape,
    settle,
)
from tests.fuzz.strategies import EXAMPLES, FUZZ_SETTINGS, event_verdict, frames, msgpack_values, verdict

MIB = 1 << 20
IDLE = 50   # more than the metrics server's listen backlog (64) minus what it accepts meanwhile


def errors(mesh, agent: str) -> Counter:
    return by_label(scrape(mesh.cfg, agent), "mesh_errors_total", "code")


def refusals(mesh, agent: str) -> Counter:
    return by_label(scrape(mesh.cfg, agent), "mesh_auth_refused_total", "reason")


def duplicates(mesh, agent: str) -> float:
    return sum(scrape(mesh.cfg, agent).get("mesh_duplicate_requests_total", Counter()).values())


def dropped(mesh, agent: str) -> Counter:
    return by_label(scrape(mesh.cfg, agent), "mesh_pubsub_dropped_total", "code")


def rejections(counts: Counter) -> Counter:
    # `timeout` is the agent's own request to the twin running late (a loaded machine), not a refused input
    return Counter({k: v for k, v in counts.items() if k != "timeout"})


def routed_verdict(parts: list[bytes]) -> str:
    """What the ROUTER makes of a message a DEALER sent (docs/PROTOCOL.md, request/reply framing)."""
    body = parts[1:] if len(parts) >= 2 and parts[0] == b"" else parts
    if len(body) != 1:
        return "undecodable"
    return verdict(body[0], MAX_FRAME)


def subscribe_events(ctx: zmq.Context, endpoint: str, prefix: bytes, **curve) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    for k, v in curve.items():
        setattr(sub, k, v)
    sub.subscribe(prefix)
    sub.connect(endpoint)
    return sub


def drain(sock: zmq.Socket, wait_ms: int = 0) -> int:
    n = 0
    while sock.poll(wait_ms):
        sock.recv_multipart()
        n += 1
    return n


def join(sub: zmq.Socket, request) -> None:
    """Until the subscriber gets an event that `request()` causes (ZeroMQ subscriptions take a moment)."""
    wait_for(lambda: request() or sub.poll(200), timeout=20, what="the subscription to take effect")
    drain(sub, 200)


def zmtp_connect(port: int, socket_type: bytes) -> socket.socket:
    """A raw TCP peer that speaks just enough ZMTP 3.0 (NULL mechanism) to get past the greeting."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31))
    prop = b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    ready = b"\x05READY" + prop
    s.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return s


def zmtp_send_long(s: socket.socket, size: int, first: bytes = b"") -> bool:
    """Sends one message of `size` bytes (long-frame header); False when the peer hung up on it."""
    try:
        s.sendall(b"\x02" + struct.pack(">Q", size) + first)
        piece = b"x" * MIB
        left = size - len(first)
        while left > 0:
            s.sendall(piece[:min(left, MIB)])
            left -= MIB
        return True
    except OSError:
        return False


# --- rpc: the ROUTER -----------------------------------------------------------------------------------


@pytest.mark.slow   # ~40 s at the default 2000 examples on 2 busy cores
def test_router_answers_every_frame_once_and_counts_every_rejection(curve_mesh, curve_keys):
    """Random, truncated and wrong-field frames (and replays of earlier valid ones) over an authenticated CURVE
    link: each gets exactly one answer; each fresh error answer is one count in mesh_errors_total{code}, with
    the code the reference codec predicts; each replay is answered from the reply cache (byte-identical, one
    mesh_duplicate_requests_total) and never handled twice (one published echo per echo handled)."""
    mesh, cfg = curve_mesh, curve_mesh.cfg
    me = load_identity(curve_keys[0], "local")
    keys = {"curve_publickey": me.public, "curve_secretkey": me.secret, "curve_serverkey": me.public}
    ctx = zmq.Context()
    sock = dealer(ctx, cfg.endpoint("target"), **keys)
    events = subscribe_events(ctx, cfg.endpoint("target", "pub"), b"echo.", **keys)
    probe = mesh.client("target")
    try:
        join(events, lambda: probe.request(Echo(seq=-1)) and False)
        errors_before, dup_before = errors(mesh, "target"), duplicates(mesh, "target")
        seen: set[bytes] = set()
        fresh_errors: Counter = Counter()
        state = {"sent": 0, "cached": 0, "handled_echo": 0, "mismatch": []}
        replayable: list[bytes] = []
        started = time.monotonic()

        @FUZZ_SETTINGS
        @given(st.lists(frames(), min_size=1, max_size=3), st.booleans(), st.integers(0, 9))
        def attack(parts, delimiter, replay):
            if replay == 0 and replayable:
                msg = [b"", replayable[state["sent"] % len(replayable)]]
            else:
                msg = ([b""] if delimiter else []) + parts
            expected = routed_verdict(msg)
            sock.send_multipart(msg)
            state["sent"] += 1
            assert sock.poll(10_000), f"no answer to {msg!r}"
            reply = sock.recv_multipart()[-1]
            if reply in seen:                      # the reply cache: the very same bytes again
                state["cached"] += 1
                return
            seen.add(reply)
            env = decode(reply, max_frame_bytes=HARD_LIMIT)
            if isinstance(env.message, Error):
                fresh_errors[env.message.code] += 1
                if expected not in ("ok", env.message.code):
                    state["mismatch"].append((msg, expected, env.message.code))
                return
            assert expected == "ok", (msg, expected, env.message)
            replayable.append(msg[-1])
            del replayable[:-500]                   # well inside the reply cache (4096 replies)
            if isinstance(env.message, Echo):
                state["handled_echo"] += 1

        attack()
        took = time.monotonic() - started
        assert not state["mismatch"], state["mismatch"][:5]
        assert sock.poll(300) == 0, "a frame was answered twice"
        settle(lambda: rejections(delta(errors(mesh, "target"), errors_before)) == fresh_errors,
               what="mesh_errors_total to count every error answer")
        assert duplicates(mesh, "target") - dup_before == state["cached"]
        published = drain(events, 500)
        while published < state["handled_echo"] and events.poll(2000):
            published += drain(events, 200)
        assert published == state["handled_echo"], "a replayed echo was handled (and published) again"
        print(f"\nFIGURES rpc(ROUTER, CURVE): {state['sent']} frames in {took:.1f} s, every one answered once; "
              f"{sum(fresh_errors.values())} rejections counted {dict(fresh_errors)}; {state['cached']} replays "
              f"answered from the cache; {state['handled_echo']} echoes handled, {published} published")
    finally:
        probe.close()
        sock.close()
        events.close()
        ctx.term()
    mesh.assert_alive()


def test_oversized_frames_are_refused_without_being_read(plain_mesh):
    """Over max_frame_bytes: a `too_large` answer correlated to the request, counted. Over the hard limit:
    libzmq drops the connection while reading the size, so the agent's peak memory does not grow."""
    mesh, cfg = plain_mesh, plain_mesh.cfg
    pid = mesh.pids["target"]
    ctx = zmq.Context()
    try:
        before = errors(mesh, "target")
        sock = dealer(ctx, cfg.endpoint("target"))
        for size in (MAX_FRAME + 1, 100_000, 500_000, HARD_LIMIT - 200):
            msg_id, frame = encode(Echo(payload=b"x" * (size - 60)), sender="fuzz")
            frame = frame + b"\x00" * max(0, size - len(frame))   # trailing bytes: still over the limit
            sock.send_multipart([b"", frame])
            assert sock.poll(10_000)
            env = decode(sock.recv_multipart()[-1])
            assert env.cid == msg_id and env.message.code == "too_large", env.message
            assert env.message.detail == {"size": len(frame), "limit": MAX_FRAME}
        sock.close()
        settle(lambda: rejections(delta(errors(mesh, "target"), before)) == Counter(too_large=4))

        peak = proc_status(pid)["VmHWM"]
        huge = b"\x00" * (48 * MIB)
        for _ in range(4):
            s = dealer(ctx, cfg.endpoint("target"), reconnect_ivl=-1)
            s.send_multipart([b"", huge])
            assert s.poll(1000) == 0, "a frame over the hard limit was answered"
            s.close()
        time.sleep(0.5)
        grown = (proc_status(pid)["VmHWM"] - peak) / 1024
        assert grown < 16, f"peak memory grew by {grown:.0f} MiB: a 48 MiB frame was read"
        print(f"\nFIGURES rpc oversized: 4 frames over max_frame_bytes answered too_large and counted; 4 x 48 MiB "
              f"over the hard limit dropped with the connection, peak memory +{grown:.1f} MiB")
    finally:
        ctx.term()
    mesh.assert_alive()


def test_replayed_requests_are_answered_from_the_cache_never_handled_twice(plain_mesh):
    """The same message id five times, over one connection, new connections and a REQ socket: one handling
    (one published echo), five identical answers. A replayed request that was refused gets its refusal again,
    counted once. A frame that does not decode is no replay: each copy is refused and counted."""
    mesh, cfg = plain_mesh, plain_mesh.cfg
    ctx = zmq.Context()
    events = subscribe_events(ctx, cfg.endpoint("target", "pub"), b"echo.")
    probe = mesh.client("target")
    try:
        join(events, lambda: probe.request(Echo(seq=-2)) and False)
        errors_before, dup_before = errors(mesh, "target"), duplicates(mesh, "target")
        seq = random.randrange(1 << 30)
        _, frame = encode(Echo(payload=b"once", seq=seq), sender="fuzz")
        answers = []
        same = dealer(ctx, cfg.endpoint("target"))
        same.send_multipart([b"", frame])
        same.send_multipart([b"", frame])          # pipelined: the second arrives before the first is answered
        answers += [same.recv_multipart()[-1] for _ in range(2)]
        for _ in range(2):
            other = dealer(ctx, cfg.endpoint("target"))
            other.send_multipart([b"", frame])
            answers.append(other.recv_multipart()[-1])
            other.close()
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(cfg.endpoint("target"))
        req.send(frame)
        answers.append(req.recv())
        req.close()
        assert len(set(answers)) == 1 and decode(answers[0]).message.seq == seq
        assert drain(events, 1000) == 1, "the replayed echo was handled more than once"

        _, refused = encode(StatusRequest(), sender="fuzz")   # the echo agent has no handler for it
        got = set()
        for _ in range(3):
            same.send_multipart([b"", refused])
            got.add(same.recv_multipart()[-1])
        assert len(got) == 1 and decode(got.pop()).message.code == "no_handler"

        broken = frame[:-3]
        for _ in range(3):
            same.send_multipart([b"", broken])
            assert decode(same.recv_multipart()[-1]).message.code == "undecodable"
        same.close()
        settle(lambda: rejections(delta(errors(mesh, "target"), errors_before)) == Counter(no_handler=1, undecodable=3))
        assert duplicates(mesh, "target") - dup_before == 4 + 2

        # the cache is bounded (4096 replies): a replay older than that is handled again, so handlers must be
        # idempotent (the extractor's upsert is). This pins the window.
        flood = dealer(ctx, cfg.endpoint("target"), sndhwm=0, rcvhwm=0)
        for i in range(4200):
            flood.send_multipart([b"", encode(Ping(), sender="fuzz")[1]])
        for i in range(4200):
            assert flood.poll(10_000)
            flood.recv_multipart()
        flood.send_multipart([b"", frame])
        assert decode(flood.recv_multipart()[-1]).message.seq == seq
        assert drain(events, 1000) == 1, "a replay beyond the cache window is handled again (expected)"
        flood.close()
    finally:
        probe.close()
        events.close()
        ctx.term()
    mesh.assert_alive()


# --- pub: the PUB socket ------------------------------------------------------------------------------


def test_pub_port_survives_garbage_and_huge_subscriptions(plain_mesh):
    """A PUB socket reads only subscriptions. Random subscription traffic from an XSUB, then one 32 MiB
    subscription over raw ZMTP: the agent keeps publishing to a normal subscriber, its memory stays flat
    (ZMQ_MAXMSGSIZE on the PUB socket: network/pubsub.py), and it answers a Ping."""
    mesh, cfg = plain_mesh, plain_mesh.cfg
    pid = mesh.pids["target"]
    ctx = zmq.Context()
    good = subscribe_events(ctx, cfg.endpoint("target", "pub"), b"echo.")
    xsub = ctx.socket(zmq.XSUB)
    xsub.linger = 0
    xsub.connect(cfg.endpoint("target", "pub"))
    probe = mesh.client("target")
    try:
        join(good, lambda: probe.request(Echo(seq=-3)) and False)
        rss_before = proc_status(pid)["VmRSS"]
        sent = {"n": 0}
        started = time.monotonic()

        @FUZZ_SETTINGS
        @given(st.lists(st.binary(max_size=80) | st.sampled_from([b"\x01", b"\x00", b"\x01echo.", b"\x00echo."])
                        | st.binary(max_size=60).map(lambda b: b"\x01" + b)
                        | st.binary(max_size=60).map(lambda b: b"\x00" + b),
                        min_size=1, max_size=3))
        def attack(parts):
            xsub.send_multipart(parts)
            sent["n"] += 1
            if sent["n"] % 250 == 0:
                probe.request(Echo(seq=sent["n"]))
                assert good.poll(5000), "a normal subscriber stopped getting events"
                drain(good)

        attack()
        took = time.monotonic() - started
        peak = proc_status(pid)["VmHWM"]
        raw = zmtp_connect(cfg.port("target", "pub"), b"SUB")
        completed = zmtp_send_long(raw, 32 * MIB, b"\x01")
        raw.close()
        time.sleep(0.5)
        grown = (proc_status(pid)["VmHWM"] - peak) / 1024
        assert grown < 8, f"peak memory grew by {grown:.0f} MiB: the 32 MiB subscription was read"
        probe.request(Echo(seq=-4))
        assert good.poll(5000)
        rss_growth = (proc_status(pid)["VmRSS"] - rss_before) / 1024
        print(f"\nFIGURES pub(PUB): {sent['n']} random subscription messages in {took:.1f} s (RSS +{rss_growth:.1f} "
              f"MiB); a 32 MiB subscription refused while reading its size (sent whole: {completed}), "
              f"peak +{grown:.1f} "
              f"MiB; nothing counted (libzmq handles subscriptions below the agent)")
    finally:
        probe.close()
        xsub.close()
        good.close()
        ctx.term()
    mesh.assert_alive()


# --- the agent's SUB: events from a peer it subscribes to ---------------------------------------------


@pytest.mark.slow   # 17-38 s at the default 2000 examples on 2 busy cores
def test_subscriber_drops_and_counts_every_bad_event(plain_mesh):
    """The watcher subscribes to `rogue`, whose pub port is a fuzzing PUB here. Every message that is not
    [topic, valid frame] is dropped and counted by code, exactly as the reference codec predicts; events over
    the hard limit cost the connection (and no memory); the watcher keeps receiving afterwards."""
    mesh, cfg = plain_mesh, plain_mesh.cfg
    pid = mesh.pids["watcher"]
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.PUB)
    rogue.linger = 0
    rogue.sndhwm = 0
    rogue.bind(cfg.bind_endpoint("rogue", "pub"))
    watcher = mesh.client("watcher")
    seq = [10**12]   # far from any seq a fuzzed Echo carries

    def sync() -> int:
        """Publishes one valid event from `rogue` and waits until the watcher has seen it: everything
        published before it on this connection has then been handled (dropped or delivered)."""
        seq[0] += 1
        mine = seq[0]

        def seen():
            rogue.send_multipart([b"probe.sync", encode(Echo(seq=mine), sender="rogue")[1]])
            return watcher.request(ProbeReport(agent="rogue")).last_seq == mine

        wait_for(seen, timeout=30, interval=0.05, what="the watcher to see the sync event")
        return mine

    try:
        assert watcher.request(ProbeWatch(agent="rogue", topic="")).type_name == "mesh.ack"
        sync()
        before = dropped(mesh, "watcher")
        expected: Counter = Counter()
        started = time.monotonic()
        state = {"n": 0}

        @FUZZ_SETTINGS
        @given(st.one_of(
            st.lists(st.binary(max_size=30) | frames(sender="rogue"), min_size=1, max_size=3),
            st.tuples(st.text(max_size=20).map(str.encode) | st.binary(max_size=20), frames(sender="rogue")).map(list),
        ))
        def attack(parts):
            code = event_verdict(parts, MAX_FRAME, publisher="rogue")
            if code != "ok":
                expected[code] += 1
            rogue.send_multipart(parts)
            state["n"] += 1
            if state["n"] % 500 == 0:
                sync()

        attack()
        for size in (MAX_FRAME + 1, 300_000, HARD_LIMIT - 100):          # over the soft limit: dropped, counted
            rogue.send_multipart([b"big", encode(Echo(payload=b"y" * size), sender="rogue")[1]])
            expected["too_large"] += 1
        sync()
        took = time.monotonic() - started
        settle(lambda: delta(dropped(mesh, "watcher"), before) == expected, what="every dropped event counted")

        # over the hard limit: libzmq drops the connection while reading the size, and would never connect
        # again (a protocol error); the Subscriber sees that, counts it and connects again (network/pubsub.py)
        peak = proc_status(pid)["VmHWM"]
        rogue.send_multipart([b"huge", b"\x00" * (48 * MIB)])
        expected["connection_dropped"] += 1
        settle(lambda: delta(dropped(mesh, "watcher"), before) == expected, what="the dropped connection counted")
        grown = (proc_status(pid)["VmHWM"] - peak) / 1024
        assert grown < 16, f"peak memory grew by {grown:.0f} MiB: the 48 MiB event was read"
        sync()   # connected again: events flow
        assert "dropped by libzmq" in mesh.log_text()
        print(f"\nFIGURES agent SUB (from a peer's PUB): {state['n']} random events in {took:.1f} s; "
              f"{sum(expected.values())} dropped and counted {dict(expected)}; the 48 MiB event cost the "
              f"connection (peak +{grown:.1f} MiB), which the subscriber restored")
    finally:
        watcher.close()
        rogue.close()
        ctx.term()
    mesh.assert_alive()


# --- metrics: the HTTP port ---------------------------------------------------------------------------


def http_raw(port: int, data: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def status(reply: bytes) -> str:
    if reply.startswith(b"HTTP/"):
        return reply[9:12].decode(errors="replace")
    return "HTTP/0.9 answer" if reply else "closed"


def test_metrics_port_survives_garbage_requests(plain_mesh):
    """Random bytes, huge and numerous headers, bad request lines and 50 idle half-open connections at the
    /metrics port: the agent answers each connection or closes it, keeps serving /metrics and Ping, and its
    threads come back down when the idle connections go."""
    mesh, cfg = plain_mesh, plain_mesh.cfg
    pid = mesh.pids["target"]
    port = cfg.port("target", "metrics")
    threads_before = proc_status(pid)["Threads"]
    statuses: Counter = Counter()
    started = time.monotonic()
    state = {"n": 0}

    @settings(FUZZ_SETTINGS, max_examples=max(EXAMPLES // 4, 50))
    @given(st.binary(max_size=300) | msgpack_values.map(lambda v: repr(v).encode() + b"\r\n\r\n")
           | st.sampled_from([b"GET /metrics HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n",
                              b"BREW /metrics HTCPCP/1.0\r\n\r\n", b"GET /metrics\r\n\r\n",
                              b"GET /metrics HTTP/9.9\r\n\r\n", b"GET /%00%ff HTTP/1.1\r\n\r\n"]))
    def attack(data):
        statuses[status(http_raw(port, data))] += 1
        state["n"] += 1

    attack()
    specials = {
        "header line of 200 kB": b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        "2000 headers": b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(2000)) + b"\r\n",
        "request line of 100 kB": b"GET /" + b"m" * 100_000 + b" HTTP/1.1\r\n\r\n",
        "content-length of 10 GB, no body": b"POST /metrics HTTP/1.1\r\nContent-Length: 10000000000\r\n\r\n",
        "chunked garbage": b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n",
    }
    t_random = time.monotonic() - started
    for what, data in specials.items():
        reply = http_raw(port, data)
        statuses[status(reply)] += 1
        assert not reply or reply.startswith(b"HTTP/"), (what, reply[:100])
    t_special = time.monotonic() - started

    idle = []
    for _ in range(IDLE):   # slowloris: half a request line, then nothing
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metr")
        idle.append(s)
    time.sleep(0.5)
    threads_idle = proc_status(pid)["Threads"]
    samples = scrape(cfg, "target")                      # still served while the idle connections hang
    assert "mesh_agent_info" in samples
    with mesh.client("target") as c:
        assert c.request(Ping()).state == "ready"
    # the server closes a connection that sends nothing for 10 s: the threads end while the clients hang on
    wait_for(lambda: proc_status(pid)["Threads"] <= threads_before + 2, timeout=30,
             what="the idle connections' threads to end")
    for s in idle:
        s.close()
    counts = errors(mesh, "target")
    counted = sum(v for code, v in counts.items() if code.startswith("http_") and code != "http_timeout")
    refused = sum(n for code, n in statuses.items() if code in ("HTTP/0.9 answer", "400", "414", "431", "501", "505"))
    # (an "HTTP/0.9 answer" is mostly a 400 page; a bare `GET /metrics` line is a real HTTP/0.9 request, answered)
    assert refused > 0 and counted >= 0.95 * refused, (dict(counts), dict(statuses))
    assert counts["http_timeout"] >= IDLE, dict(counts)      # every idle connection closed and counted
    took = time.monotonic() - started
    print(f"\n(random {t_random:.1f} s, specials {t_special - t_random:.1f} s, idle {took - t_special:.1f} s)")
    print(f"\nFIGURES metrics(HTTP): {state['n']} random requests + {len(specials)} oversized/malformed "
          f"in {took:.1f} s, "
          f"answers by status {dict(statuses)}; {IDLE} idle connections held {threads_idle - threads_before} threads, "
          f"all released after the 10 s request timeout; {counted} malformed requests and "
          f"{counts['http_timeout']} timeouts counted in mesh_errors_total{{code=http_*}}")
    mesh.assert_alive()


# --- CURVE: clients without the right keys ------------------------------------------------------------


def test_curve_refuses_and_counts_every_unauthenticated_client(curve_mesh, curve_keys):
    """At both CURVE ports (rpc and pub): a client without CURVE, a client whose key the mesh does not know
    (with the right server key), a known client key with the wrong server key, and a TCP connection that
    says nothing. Each attempt (no reconnects) is refused and counted once under its reason; the right key
    still gets answers and events."""
    mesh, cfg = curve_mesh, curve_mesh.cfg
    keys_dir, outsider = curve_keys
    me, intruder = load_identity(keys_dir, "local"), load_identity(outsider, "intruder")
    ctx = zmq.Context()
    per_port = 3

    ended = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def zmq_attempt(kind: int, endpoint: str, public=None, secret=None, server=None) -> None:
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.reconnect_ivl = -1                        # one handshake, so one refusal
        if public is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
        if kind == zmq.SUB:
            sock.subscribe(b"")
        monitor = sock.get_monitor_socket(events=ended)
        sock.connect(endpoint)
        # until the handshake is over from the client's side too (closing earlier is a different refusal)
        assert monitor.poll(10_000), "the handshake neither failed nor ended"
        event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "an unauthenticated client completed the handshake"
        assert sock.poll(0) == 0
        sock.disable_monitor()
        monitor.close()
        sock.close()

    def silent(endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        socket.create_connection((host[len("tcp://"):], int(port)), timeout=5).close()

    attempts = {
        "protocol": [lambda kind, ep: zmq_attempt(kind, ep),                                       # no CURVE
                     lambda kind, ep: zmq_attempt(kind, ep, me.public, me.secret, intruder.public)],  # wrong server key
        "auth": [lambda kind, ep: zmq_attempt(kind, ep, intruder.public, intruder.secret, me.public)],  # unknown key
        "handshake": [lambda kind, ep: silent(ep)],                                                # says nothing
    }
    try:
        for agent in ("target", "watcher"):
            before = refusals(mesh, agent)
            errors_before = errors(mesh, agent)
            expected: Counter = Counter()
            for kind, which in ((zmq.DEALER, "rpc"), (zmq.SUB, "pub")):
                endpoint = cfg.endpoint(agent, which)
                for reason, makers in attempts.items():
                    for make in makers:
                        for _ in range(per_port):
                            make(kind, endpoint)
                            expected[reason] += 1
            # Each attempt is counted once. `auth` (the ZAP handler refused the key) is exact; a client without
            # CURVE is `protocol` (mechanism mismatch) or, when it hangs up first and the server's write fails,
            # `handshake`: libzmq reports whichever side noticed first.
            def counted() -> bool:
                got = delta(refusals(mesh, agent), before)
                return (sum(got.values()) == sum(expected.values()) and got["auth"] == expected["auth"]
                        and got["protocol"] + got["handshake"] == expected["protocol"] + expected["handshake"])

            settle(counted, timeout=20, what=f"{agent}: every refused handshake counted, {dict(expected)}")
            got = delta(refusals(mesh, agent), before)
            assert rejections(delta(errors(mesh, agent), errors_before)) == Counter(auth_refused=sum(expected.values()))

            # below the handshake: bytes that are not ZMTP, and a CURVE greeting followed by garbage
            before_raw = refusals(mesh, agent)
            for which in ("rpc", "pub"):
                port = cfg.port(agent, which)
                for i in range(per_port):
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        s.sendall(os.urandom(300))
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        s.sendall(b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + bytes(32)
                                  + os.urandom(500))
            time.sleep(0.5)
            raw_counted = sum(delta(refusals(mesh, agent), before_raw).values())
            print(f"\nFIGURES CURVE {agent}: {sum(expected.values())} refused handshakes at rpc and pub, all counted "
                  f"(sent {dict(expected)}, counted {dict(got)}); {4 * per_port} raw non-ZMTP/garbage-after-greeting "
                  f"connections dropped by libzmq, {raw_counted:.0f} of them counted")

        # the right keys still work, both ways
        keys = {"curve_publickey": me.public, "curve_secretkey": me.secret, "curve_serverkey": me.public}
        events = subscribe_events(ctx, cfg.endpoint("target", "pub"), b"echo.", **keys)
        with mesh.client("target") as c:
            join(events, lambda: c.request(Echo(seq=-5)) and False)
        events.close()
    finally:
        ctx.term()
    mesh.assert_alive()
