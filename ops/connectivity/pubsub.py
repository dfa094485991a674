"""5. Pub/sub both ways between the probe agents: the remote probe's events reach us (we subscribe
to its pub port and make it echo), and our probe's events reach the remote one (probe.watch, then
echoes to ours and probe.report until the remote has counted one)."""

from __future__ import annotations

import random
import time

import zmq

from agents.probe import ProbeCounts, ProbeReport, ProbeWatch
from network.codec import Envelope
from network.messages import Echo
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from network.rpc import MeshError
from network.security import Guard
from ops.connectivity.report import FAIL, PASS, Check, fmt_ms
from ops.connectivity.session import SENDER, Session


def check_pubsub_in(s: Session, agent: str) -> Check:
    """remote probe publishes -> we receive: subscribe to its pub port, make it echo until an event comes."""
    host = s.cfg.host_of(agent)
    name = f"pub/sub {host}->{s.me}"
    pub = s.cfg.endpoint(agent, "pub").removeprefix("tcp://")
    got: list[float] = []
    seq0 = random.randrange(1 << 30)

    def on_event(topic: str, env: Envelope) -> None:
        if env.sender == agent and topic == "probe.echo" and getattr(env.message, "seq", -1) >= seq0:
            got.append(time.perf_counter())

    guard = Guard(s.ctx, s.identity)
    sub = Subscriber(s.ctx, on_event, metrics=MeshMetrics(SENDER, "tool"), guard=guard,
                     max_frame_bytes=s.cfg.mesh.max_frame_bytes)
    sends = 0
    error = error_code = ""
    started = time.perf_counter()
    try:
        sub.connect(s.cfg.endpoint(agent, "pub"), host)
        sub.subscribe("probe.")
        poller = zmq.Poller()
        poller.register(sub.socket, zmq.POLLIN)
        deadline = started + s.timeout
        with s.client(agent) as c:
            while not got and (left := deadline - time.perf_counter()) > 0:
                try:
                    c.request(Echo(payload=b"connectivity", seq=seq0 + sends), timeout=left)
                except MeshError as exc:
                    if exc.code != "timeout" or not sends:  # a late timeout: the budget ran out, say so below
                        error, error_code = exc.message, exc.code
                    break
                sends += 1
                wait_until = min(deadline, time.perf_counter() + 0.05 * min(sends, 4))
                while not got and (left := wait_until - time.perf_counter()) > 0:
                    if poller.poll(left * 1000):
                        sub.on_readable()
    finally:
        sub.close()
        guard.close()
    if got:
        took = got[0] - started
        return Check(s.link(agent), agent, host, name, PASS, f"event in {fmt_ms(took)} ({sends} echo(s) sent)",
                     data={"ms": round(took * 1000, 3), "sends": sends})
    if error:
        return Check(s.link(agent), agent, host, name, FAIL, f"mesh.echo failed ({error_code})",
                     *request_failed(s, agent, "mesh.echo", error_code, error), {"sends": sends})
    return Check(s.link(agent), agent, host, name, FAIL, f"no event within {s.timeout:g}s ({sends} echo(s))",
                 f"{agent} answered {sends} echo(s) but none of its events arrived from {pub}: the pub port is "
                 f"blocked (firewall on {host}), its CURVE refuses {s.me}'s subscriber, or the link is lossy",
                 f"on {host}: open port {s.cfg.port(agent, 'pub')} in the firewall; `meshctl logs {agent}` "
                 f"for 'refused a subscriber'; `meshctl keys list` on both hosts", {"sends": sends})


def request_failed(s: Session, agent: str, what: str, code: str, message: str, *,
                   local: str = "") -> tuple[str, str]:
    """(cause, fix) for a probe request that failed, by error code."""
    host = s.cfg.host_of(agent)
    if code == "timeout":
        return (f"{what} got no reply within {s.timeout:g}s although mesh.ping did: the link is lossy or "
                f"congested, or the agent stalls ({message})",
                f"`ping -c 50 {s.addr(host)}` for loss; on {host}: `meshctl logs {agent}`; run this again")
    if code == "unknown_agent":
        return (f"{host}'s config does not declare {local}: the two hosts run different mesh configs",
                "use the same config/mesh.yaml on both hosts; restart both meshes")
    if code in ("no_handler", "unknown_type"):
        return (f"{agent} does not handle {what} ({code}): it is not of kind probe on {host}, or {host} runs an "
                f"older agent-mesh", f"update agent-mesh on {host} and use the same config/mesh.yaml on both hosts")
    return f"{agent} answered {what} with {code}: {message}", f"on {host}: `meshctl logs {agent}`"


def check_pubsub_out(s: Session, agent: str) -> Check:
    """our probe publishes -> the remote probe receives: probe.watch, echoes to ours, probe.report until counted."""
    host = s.cfg.host_of(agent)
    name = f"pub/sub {s.me}->{host}"
    local = s.local_probe
    started = time.perf_counter()
    deadline = started + s.timeout
    sends = 0
    with s.client(agent) as remote, s.client(local) as mine:
        try:
            remote.request(ProbeWatch(agent=local), timeout=s.timeout)
            base = remote.request(ProbeReport(agent=local), timeout=s.timeout)
        except MeshError as exc:
            return Check(s.link(agent), agent, host, name, FAIL, f"probe.watch failed ({exc.code})",
                         *request_failed(s, agent, "probe.watch", exc.code, exc.message, local=local))
        assert isinstance(base, ProbeCounts)
        counts = base
        try:
            while (left := deadline - time.perf_counter()) > 0:
                mine.request(Echo(payload=b"connectivity", seq=random.randrange(1 << 30)), timeout=left)
                sends += 1
                time.sleep(min(0.02 * sends, 0.1, max(0.0, deadline - time.perf_counter())))
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                counts = remote.request(ProbeReport(agent=local), timeout=left)
                if counts.received > base.received:
                    took = time.perf_counter() - started
                    return Check(s.link(agent), agent, host, name, PASS,
                                 f"{agent} received {counts.received - base.received} event(s) in {fmt_ms(took)} "
                                 f"({sends} echo(s) sent)",
                                 data={"ms": round(took * 1000, 3), "sends": sends,
                                       "received": counts.received - base.received})
        except MeshError as exc:
            return Check(s.link(agent), agent, host, name, FAIL, f"echo / probe.report failed ({exc.code})",
                         *request_failed(s, agent, "mesh.echo / probe.report", exc.code, exc.message,
                                        local=local))
    mine_pub = s.cfg.endpoint(local, "pub").removeprefix("tcp://")
    return Check(s.link(agent), agent, host, name, FAIL, f"0 events within {s.timeout:g}s ({sends} published)",
                 f"{agent} on {host} received none of {local}'s events from {mine_pub}: {host} cannot reach "
                 f"{s.me}'s pub port (firewall on {s.me}, or {s.addr_var(s.me)} on {host} is not "
                 f"{s.addr(s.me)}), or {s.me} refuses {host}'s key",
                 f"on {host}: `nc -vz {s.addr(s.me)} {s.cfg.port(local, 'pub')}` and check "
                 f"{s.addr_var(s.me)} there; open ports on {s.me}'s firewall; `meshctl logs {local}` on "
                 f"{s.me} for 'refused a subscriber'", {"sends": sends})
