"""Mesh overhead over raw ZeroMQ: request/reply round trip and pub/sub throughput, in one run.

What is measured (every side in a process of its own, loopback TCP, a 100-byte payload by default):

* rpc raw   -- pyzmq REQ (this process) -> REP (worker process). The request is the msgpack map
               {"payload": <bytes>, "seq": i}, the same fields as the mesh's `Echo` body; the server
               unpacks it and packs it back; the client unpacks the reply and checks `seq`.
* rpc mesh  -- network.rpc.RpcClient (this process) -> the `echo` agent (agents/echo.py) run by
               `python -m ops.meshctl up` from a generated config (twin + echo, free ports, temp
               data_dir). Full production path: envelope, pydantic validation on both sides,
               metrics, reactor, reply cache.
* pubsub raw  -- PUB in one worker process sending [b"mesh.echo", msgpack body] as fast as it can;
                 SUB in another worker receiving and msgpack-decoding.
* pubsub mesh -- network.pubsub.Publisher publishing `Echo` messages in one worker;
                 network.pubsub.Subscriber (on a Reactor, `on_readable`) decoding and validating
                 them in another.

Round trip: mean of sequential requests. Each rep runs blocks of 250 calls with raw and mesh
alternating block by block, so both see the same conditions: on a small VM the raw round trip
alone moves between ~40 us (client and server sharing a core) and ~75 us (on different cores).
Throughput: the publisher publishes without pacing (PUB drops at its high-water mark, 100k on both
sides, as in the mesh); the subscriber skips a warm-up period after its first message, then counts
what it actually received and decoded in a fixed window: received/s. The sequence numbers it saw
give the number published over that window, so drops are reported too (published/s equal to
received/s with no drops means the publisher, not the subscriber, set the pace).

Everything is warmed up first, repeated (raw and mesh interleaved, order alternating) and the
median taken. Agent logs (temp data_dir) are scanned for warnings and errors. The last line is:

    RESULT rpc_ratio=<mesh/raw round trip> pubsub_ratio=<mesh/raw throughput> rpc_raw_us=.. ...

Usage: .venv/bin/python bench/mesh.py [--quick] [--payload 100] [--reps 7]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

import msgpack  # noqa: E402
import zmq  # noqa: E402

from bench._util import install_sigterm_as_interrupt, run_main, scan_logs, summarize_logs  # noqa: E402
from testing.harness import MeshUp, free_port_block, write_config  # noqa: E402

TOPIC = "mesh.echo"
HWM = 100_000  # the mesh's Publisher and Subscriber defaults; the raw sockets use the same


def _packer():
    # The same packer settings as network/codec.py.
    return msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _unpack(frame: bytes):
    return msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True)


# --- worker processes ----------------------------------------------------------------------------------
# Each worker serves commands from the bench process over a Pipe; EOF (the bench process died) ends it.


def _worker_signals() -> None:
    # Ctrl-C reaches the whole foreground process group; the bench process stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def raw_rep_worker(conn) -> None:
    """REP server: unpack the request, pack it back. An empty frame stops it."""
    _worker_signals()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    packb = _packer()
    try:
        while True:
            frame = sock.recv()
            if not frame:
                sock.send(b"")
                break
            sock.send(packb(_unpack(frame)))
    finally:
        sock.close(0)
        ctx.term()


def pub_worker(conn) -> None:
    """Per command ("raw"|"mesh", payload_size): bind, report the endpoint, wait for "go", publish
    until told to stop, report (sent, seconds)."""
    _worker_signals()
    from network.messages import Echo
    from network.metrics import MeshMetrics
    from network.pubsub import Publisher

    ctx = zmq.Context()
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd is None:
                return
            mode, size = cmd
            payload = os.urandom(size)
            if mode == "raw":
                sock = ctx.socket(zmq.PUB)
                sock.linger = 0
                sock.sndhwm = HWM
                sock.bind("tcp://127.0.0.1:*")
                endpoint = sock.last_endpoint.decode()
                closer = sock.close
            else:
                pub = Publisher(ctx, "tcp://127.0.0.1:*", sender="bench-pub", metrics=MeshMetrics("bench-pub", "bench"))
                endpoint, closer = pub.endpoint, pub.close
            conn.send(endpoint)
            if conn.recv() != "go":
                closer()
                continue
            sent = 0
            started = time.perf_counter()
            if mode == "raw":
                packb, send, topic = _packer(), sock.send_multipart, TOPIC.encode()
                while not conn.poll():
                    for _ in range(256):
                        send([topic, packb({"payload": payload, "seq": sent})])
                        sent += 1
            else:
                publish = pub.publish
                while not conn.poll():
                    for _ in range(256):
                        publish(Echo(payload=payload, seq=sent))
                        sent += 1
            elapsed = time.perf_counter() - started
            conn.recv()  # "stop"
            closer()
            conn.send((sent, elapsed))
    finally:
        ctx.term()


def sub_worker(conn) -> None:
    """Per command ("raw"|"mesh", endpoint, warmup_s, window_s): connect, subscribe, report "ready";
    after the first message skip warmup_s, then count received messages for window_s; report
    (received, seconds, first seq, last seq) or an error string."""
    _worker_signals()
    from network.messages import Echo
    from network.metrics import MeshMetrics
    from network.pubsub import Subscriber
    from network.reactor import Reactor

    ctx = zmq.Context()
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd is None:
                return
            mode, endpoint, warmup_s, window_s = cmd
            state = {"n": 0, "seq": -1}
            if mode == "raw":
                sock = ctx.socket(zmq.SUB)
                sock.linger = 0
                sock.rcvhwm = HWM
                sock.connect(endpoint)
                sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
                recv = sock.recv_multipart

                def pump(wait_s: float) -> None:
                    if not sock.poll(wait_s * 1000):
                        return
                    n, seq = state["n"], state["seq"]
                    for _ in range(1000):
                        try:
                            frames = recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        seq = _unpack(frames[1])["seq"]
                        n += 1
                    state["n"], state["seq"] = n, seq

                closer = sock.close
            else:
                def on_message(topic: str, env) -> None:
                    msg = env.message
                    assert type(msg) is Echo
                    state["n"] += 1
                    state["seq"] = msg.seq

                sub = Subscriber(ctx, on_message, metrics=MeshMetrics("bench-sub", "bench"))
                sub.connect(endpoint)
                sub.subscribe(TOPIC)
                reactor = Reactor()
                sub.attach(reactor)

                def pump(wait_s: float) -> None:
                    reactor.run_once(wait_s)

                closer = sub.close
            conn.send("ready")
            deadline = time.monotonic() + 10.0
            while state["n"] == 0 and time.monotonic() < deadline:
                pump(0.05)
            if state["n"] == 0:
                closer()
                conn.send("no message within 10 s")
                continue
            perf = time.perf_counter
            end = perf() + warmup_s
            while perf() < end:
                pump(0.05)
            n0, seq0, t0 = state["n"], state["seq"], perf()
            end = t0 + window_s
            while (t := perf()) < end:
                pump(0.05)
            received, last_seq = state["n"] - n0, state["seq"]
            closer()
            conn.send((received, t - t0, seq0, last_seq))
    finally:
        ctx.term()


class Worker:
    def __init__(self, ctx, target, name: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child,), name=name, daemon=True)
        self.proc.start()
        child.close()

    def ask(self, msg, timeout: float = 30.0):
        self.conn.send(msg)
        return self.recv(timeout)

    def recv(self, timeout: float = 30.0):
        if not self.conn.poll(timeout):
            raise RuntimeError(f"worker {self.proc.name} did not answer within {timeout:.0f}s")
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


# --- measurements ----------------------------------------------------------------------------------------


def rpc_raw(sock: zmq.Socket, payload: bytes, n: int, times: list[float]) -> float:
    """n sequential round trips; appends each to `times`, returns the total seconds."""
    packb, perf, send, recv, append = _packer(), time.perf_counter, sock.send, sock.recv, times.append
    started = perf()
    for i in range(n):
        t = perf()
        send(packb({"payload": payload, "seq": i}))
        reply = _unpack(recv())
        append(perf() - t)
        if reply["seq"] != i:
            raise RuntimeError(f"raw reply seq {reply['seq']} != {i}")
    return perf() - started


def rpc_mesh(client, payload: bytes, n: int, times: list[float]) -> float:
    from network.messages import Echo

    perf, request, append = time.perf_counter, client.request, times.append
    started = perf()
    for i in range(n):
        t = perf()
        reply = request(Echo(payload=payload, seq=i))
        append(perf() - t)
        if reply.seq != i:
            raise RuntimeError(f"mesh reply seq {reply.seq} != {i}")
    return perf() - started


def pubsub(pub: Worker, sub: Worker, mode: str, size: int, warmup_s: float, window_s: float) -> dict:
    endpoint = pub.ask((mode, size))
    ready = sub.ask((mode, endpoint, warmup_s, window_s))
    assert ready == "ready", ready
    pub.conn.send("go")
    result = sub.recv(timeout=warmup_s + window_s + 30)
    pub.conn.send("stop")
    pub.recv()
    if isinstance(result, str):
        raise RuntimeError(f"pub/sub {mode}: {result}")
    received, seconds, seq0, seq1 = result
    published = max(seq1 - seq0, received)  # sequence numbers the publisher used during the window
    return {"per_s": received / seconds, "published_per_s": published / seconds,
            "drop_pct": 100.0 * (1 - received / published)}


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


# --- main ------------------------------------------------------------------------------------------------


def start_echo_mesh(tmp: Path) -> tuple[MeshUp, object]:
    from mesh.config import load_config

    base = free_port_block(12)
    data = {
        "mesh": {"name": "bench", "base_port": base, "heartbeat_interval_s": 1.0, "data_dir": str(tmp / "data")},
        "hosts": {"local": {"address": "127.0.0.1"}},
        "groups": {"core": {"host": "local", "agents": ["twin"]}, "tools": {"host": "local", "agents": ["echo"]}},
        "agents": {"twin": {"kind": "digital_twin"}, "echo": {"kind": "echo", "depends_on": ["twin"]}},
        "security": {"curve": "off"},
    }
    path = write_config(data, tmp / "mesh.yaml")
    config = load_config(path)
    return MeshUp(path, out=tmp / "meshctl-up.out"), config


def wait_ready(up: MeshUp, config, agent: str, timeout: float = 30.0) -> float:
    from mesh.control import fetch_status
    from network.rpc import MeshError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not up.running():
            raise RuntimeError(f"meshctl up exited early:\n{up.output()[-3000:]}")
        try:
            status = fetch_status(config, timeout=0.5)
        except MeshError:
            time.sleep(0.1)
            continue
        if any(a.agent == agent and a.state == "ready" for a in status.agents):
            return time.monotonic() - up.started
        time.sleep(0.1)
    raise RuntimeError(f"{agent} not ready within {timeout:.0f}s:\n{up.output()[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 reps, shorter windows (~10 s)")
    ap.add_argument("--payload", type=int, default=100, help="payload bytes (default 100)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each measurement (default 7, quick 3)")
    ap.add_argument("--calls", type=int, default=None,
                    help="round trips per rpc measurement and rep (default 4000, quick 1500)")
    ap.add_argument("--window", type=float, default=None, help="pub/sub counting window in s (default 1.2, quick 0.6)")
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    calls = args.calls or (1500 if args.quick else 4000)
    window = args.window or (0.6 if args.quick else 1.2)
    warmup = 0.2 if args.quick else 0.3
    block = min(250, calls)
    payload = os.urandom(args.payload)
    install_sigterm_as_interrupt()

    from network.rpc import RpcClient

    started = time.monotonic()
    mpctx = mp.get_context("spawn")
    workers: list[Worker] = []
    up: MeshUp | None = None
    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-mesh-")
    tmp = Path(tmp_ctx.name)
    zctx = zmq.Context()
    raw_sock = client = None
    problems: list[str] = []
    try:
        up, config = start_echo_mesh(tmp)
        rep_worker = Worker(mpctx, raw_rep_worker, "raw-rep")
        pub = Worker(mpctx, pub_worker, "pub")
        sub = Worker(mpctx, sub_worker, "sub")
        workers += [rep_worker, pub, sub]
        ready_s = wait_ready(up, config, "echo")
        print(f"echo agent ready {ready_s:.1f}s after `meshctl up` (data dir {tmp}); "
              f"payload {args.payload} B, {reps} reps, {calls} calls, {window}s windows", flush=True)

        raw_sock = zctx.socket(zmq.REQ)
        raw_sock.linger = 0
        raw_sock.connect(f"tcp://127.0.0.1:{rep_worker.recv()}")
        client = RpcClient(config.endpoint("echo", "rpc"), sender="bench", timeout=5.0, retries=0)

        # Warm-up: connections, caches, allocator, both servers' first requests.
        rpc_raw(raw_sock, payload, 500, [])
        rpc_mesh(client, payload, 500, [])
        pubsub(pub, sub, "raw", args.payload, 0.1, 0.1)
        pubsub(pub, sub, "mesh", args.payload, 0.1, 0.1)

        # Request/reply: each rep runs blocks of `block` calls, raw and mesh alternating block by block,
        # so both see the same scheduler placement (on a small VM, client and server sharing a core or
        # not changes the raw round trip by ~2x) and the same background activity.
        rpc_means: dict[str, list[float]] = {"raw": [], "mesh": []}
        rpc_times: dict[str, list[float]] = {"raw": [], "mesh": []}
        ps: dict[str, list[dict]] = {"raw": [], "mesh": []}
        for rep in range(reps):
            order = ("raw", "mesh") if rep % 2 == 0 else ("mesh", "raw")
            total = {"raw": 0.0, "mesh": 0.0}
            for b in range(max(1, calls // block)):
                for mode in (order if b % 2 == 0 else order[::-1]):
                    if mode == "raw":
                        total[mode] += rpc_raw(raw_sock, payload, block, rpc_times[mode])
                    else:
                        total[mode] += rpc_mesh(client, payload, block, rpc_times[mode])
            for mode in order:
                rpc_means[mode].append(total[mode] / (max(1, calls // block) * block))
            for mode in order:
                ps[mode].append(pubsub(pub, sub, mode, args.payload, warmup, window))
            print(f"  rep {rep + 1}/{reps}: rpc raw {rpc_means['raw'][-1] * 1e6:.1f} us, "
                  f"mesh {rpc_means['mesh'][-1] * 1e6:.1f} us; pubsub raw {ps['raw'][-1]['per_s']:,.0f}/s, "
                  f"mesh {ps['mesh'][-1]['per_s']:,.0f}/s", flush=True)
    finally:
        if client is not None:
            client.close()
        if raw_sock is not None:
            try:
                raw_sock.send(b"")  # stops the REP worker
                raw_sock.poll(1000)
            except zmq.ZMQError:
                pass
            raw_sock.close(0)
        zctx.term()
        for w in workers:
            w.stop()
        if up is not None:
            stop_t = time.time()
            up.stop()
            leftovers = up.leftovers
            if leftovers:
                problems.append(f"killed processes left after meshctl up stopped: {leftovers}")
            problems += summarize_logs(scan_logs(tmp / "data" / "logs"),
                                       phases=[("running", 0.0), ("stopping", stop_t)])
            out = up.output()
            for line in out.splitlines():
                if any(w in line for w in ("Traceback", "ERROR", "WARNING", "Error")):
                    problems.append(f"meshctl-up: {line.strip()[:300]}")
        tmp_ctx.cleanup()

    rpc_raw_us = statistics.median(rpc_means["raw"]) * 1e6
    rpc_mesh_us = statistics.median(rpc_means["mesh"]) * 1e6
    ps_raw = statistics.median(r["per_s"] for r in ps["raw"])
    ps_mesh = statistics.median(r["per_s"] for r in ps["mesh"])
    rpc_ratio, ps_ratio = rpc_mesh_us / rpc_raw_us, ps_mesh / ps_raw

    print()
    print(f"request/reply, {args.payload} B payload: mean per rep (median of {reps} reps, range), "
          f"percentiles over all {len(rpc_times['raw'])} calls")
    print(f"  {'':<8}{'mean us':>10}{'range us':>16}{'p50 us':>10}{'p99 us':>10}")
    for mode in ("raw", "mesh"):
        t = sorted(rpc_times[mode])
        lo, hi = min(rpc_means[mode]) * 1e6, max(rpc_means[mode]) * 1e6
        print(f"  {mode:<8}{statistics.median(rpc_means[mode]) * 1e6:>10.1f}{f'{lo:.0f}-{hi:.0f}':>16}"
              f"{percentile(t, 0.5) * 1e6:>10.1f}{percentile(t, 0.99) * 1e6:>10.1f}")
    print(f"  mesh / raw round trip: {rpc_ratio:.2f}   (target <= 1.5)")
    print()
    print(f"pub/sub, {args.payload} B payload: received and decoded per second in {window:g} s windows "
          f"(median of {reps}, range); published/s and drops over the same windows")
    print(f"  {'':<8}{'recv/s':>10}{'range':>20}{'published/s':>13}{'dropped':>9}")
    for mode in ("raw", "mesh"):
        rows = ps[mode]
        lo, hi = min(r["per_s"] for r in rows), max(r["per_s"] for r in rows)
        print(f"  {mode:<8}{statistics.median(r['per_s'] for r in rows):>10,.0f}{f'{lo:,.0f}-{hi:,.0f}':>20}"
              f"{statistics.median(r['published_per_s'] for r in rows):>13,.0f}"
              f"{statistics.median(r['drop_pct'] for r in rows):>8.1f}%")
    print(f"  mesh / raw throughput: {ps_ratio:.2f}   (target >= 0.5)")
    print()
    if problems:
        print("warnings/errors in agent logs or meshctl output:")
        for p in problems[:20]:
            print("  " + p)
    else:
        print("agent logs: no warnings or errors")
    print(f"total {time.monotonic() - started:.1f}s")
    print(f"RESULT rpc_ratio={rpc_ratio:.3f} pubsub_ratio={ps_ratio:.3f} rpc_raw_us={rpc_raw_us:.1f} "
          f"rpc_mesh_us={rpc_mesh_us:.1f} pubsub_raw_per_s={ps_raw:.0f} pubsub_mesh_per_s={ps_mesh:.0f}")
    return 0


if __name__ == "__main__":
    run_main(main)
