#!/usr/bin/env python3
"""Can MainPC and PC2 work together? One run checks every link from this host to the other.

    python test_pc2_connectivity.py                 # on MainPC (config/mainpc.yaml)
    python test_pc2_connectivity.py --from pc2      # on PC2 (config/pc2.yaml)
    python test_pc2_connectivity.py --json          # machine-readable report

For every agent placed on the other host (the probe, and the twin when it lives there) it
checks, each with a timeout, and prints one table with the measured values:

  tcp rpc/pub/metrics   plain TCP connect: "refused" (nothing listens) vs "no answer" (address, link, firewall)
  curve                 a mesh.ping with this host's CURVE keys is answered (off: a warning)
  curve: unknown key    a throwaway key pair gets no answer (the remote admits only known keys)
  rpc                   N mesh.ping round trips: p50 / p99
  clock                 the remote's clock against ours, from the replies' envelope timestamps
  pub/sub A->B, B->A    events flow both ways between the probe agents (kind `probe`)
  twin, twin view       the twin answers and sees every agent across the link ready

Each check is pass, fail or warn; "skip" marks one not run because an earlier check of the same
link failed (the failed one names the cause). Below the table: for each failure and warning the
likely cause and the command that fixes it. A dead link costs about one --timeout, not one per
check: TCP and CURVE are checked for all agents at once, and a link that fails them is not
probed further. Exit status: 0 every check passed (warnings allowed), 1 a check failed, 2 bad
config.

Not a pytest module (despite its name): pytest's testpaths is tests/, and nothing here is
named test_*. tests/test_connectivity_local.py runs it against two real meshes on loopback.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import pydantic  # noqa: E402, F401
    import rich  # noqa: E402, F401
    import yaml  # noqa: E402, F401
    import zmq  # noqa: E402
except ImportError as missing:  # run by a Python without the project's dependencies: use the repository's .venv
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.exit(f"{missing}: run this with the project's Python (.venv/bin/python {Path(__file__).name}; "
             f"`scripts/run` or `scripts/test` sets .venv up)")
from zmq.utils.monitor import parse_monitor_message  # noqa: E402

from agents.config import ConfigError, MeshConfig, load_config  # noqa: E402

SENDER = "connectivity"
PROBE_KINDS = ("probe", "agents.probe:ProbeAgent")
MAX_PROBE_TIMEOUTS = 3  # stop the round-trip series after this many timeouts: a dead link must not cost N x timeout
RPC_BUDGET_TIMEOUTS = 3  # and after this many --timeout's in all, however slowly the replies come
JITTER_WARN_S = 0.25  # a p90 round trip above this (and 10x the median) is a warning: retransmits

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
STYLE = {PASS: "bold green", FAIL: "bold red", WARN: "bold yellow", SKIP: "dim"}


@dataclass
class Check:
    link: str
    agent: str
    host: str
    check: str
    status: str
    value: str = ""
    cause: str = ""
    fix: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Attempt:
    """One mesh.ping on a fresh socket whose handshake is watched through a socket monitor."""

    outcome: str  # answered | refused_auth | handshake_failed | no_reply | no_handshake | no_connect
    ms: float
    detail: str = ""
    message: object = None  # the reply, when answered


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def _secs(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Connectivity:
    def __init__(self, cfg: MeshConfig, args: argparse.Namespace, config_arg: str):
        self.cfg = cfg
        self.args = args
        self.timeout = args.timeout
        self.me = cfg.this_host
        self.config_arg = config_arg
        self.results: list[Check] = []
        self.ctx = zmq.Context()
        self.identity = None
        self.identity_error = ""
        self.curve = cfg.curve_enabled(self.me)
        if self.curve:
            from network.security import MissingKey, load_identity
            try:
                self.identity = load_identity(cfg.security.keys_dir, self.me)
            except MissingKey as exc:
                self.identity_error = str(exc)
        self.remote = [a for a in cfg.agents if cfg.host_of(a) != self.me]
        self.remote.sort(key=lambda a: (a != cfg.twin, cfg.host_of(a)))  # the twin first, then by host
        self.local_probe = next((a for a in cfg.agents_on(self.me) if cfg.agents[a].kind in PROBE_KINDS), None)

    # --- small helpers -------------------------------------------------------------------------

    def add(self, agent: str, host: str, check: str, status: str, value: str = "", cause: str = "", fix: str = "",
            link: str | None = None, **data) -> Check:
        c = Check(link=link or self.link(agent), agent=agent, host=host, check=check, status=status, value=value,
                  cause=cause, fix=fix, data=data)
        self.results.append(c)
        return c

    def link(self, agent: str) -> str:
        host = self.cfg.host_of(agent)
        return f"{self.me} -> {agent}@{host}" + (" (local)" if host == self.me else "")

    def config_for(self, host: str) -> str:
        """The config file a host runs with, as a path the owner can type."""
        if host == self.me:
            return self.config_arg
        if self.args.config:
            sibling = Path(self.args.config).parent / f"{host}.yaml"
            if sibling.exists():
                return str(sibling)
        return f"config/{host}.yaml"

    def up_cmd(self, host: str) -> str:
        return f"meshctl up --config {self.config_for(host)}"

    def addr(self, host: str) -> str:
        return self.cfg.hosts[host].address

    @staticmethod
    def addr_var(host: str) -> str:
        return f"{host.upper().replace('-', '_')}_ADDRESS"

    def key_fix(self) -> str:
        return (f"`meshctl keys list` on both hosts; make missing keys with `meshctl keys generate HOST` on that host "
                f"and copy keys/public/*.key to both hosts' {self.cfg.security.keys_dir}/public/, then restart "
                f"both meshes")

    def client(self, agent: str, timeout: float | None = None):
        from agents.control import client
        return client(self.cfg, agent, timeout=timeout or self.timeout, retries=0, sender=SENDER, host=self.me)

    def curve_keys(self, server_host: str) -> tuple[bytes, bytes, bytes] | None:
        if self.identity is None:
            return None
        return self.identity.public, self.identity.secret, self.identity.server_key(server_host)

    # --- 1. TCP --------------------------------------------------------------------------------

    def check_tcp(self, agent: str, which: str) -> Check:
        host = self.cfg.host_of(agent)
        address, port = self.addr(host), self.cfg.port(agent, which)
        where = f"{address}:{port}"
        started = time.perf_counter()
        try:
            with socket.create_connection((address, port), timeout=self.timeout):
                pass
        except ConnectionRefusedError:
            return Check(self.link(agent), agent, host, f"tcp {which}", FAIL, f"refused {where}",
                         f"nothing listens on {where} ({agent} {which}): the mesh is not running on {host}, "
                         f"or {agent} is down",
                         f"start the mesh on {host}: {self.up_cmd(host)} (if it runs: `meshctl status` and "
                         f"`meshctl logs {agent}` there)", {"reason": "refused", "address": address, "port": port})
        except (TimeoutError, socket.timeout):
            return Check(self.link(agent), agent, host, f"tcp {which}", FAIL, f"no answer from {where}",
                         f"no answer from {where} within {self.timeout:g}s: wrong address or link down "
                         f"(or a firewall dropping packets)",
                         f"check {self.addr_var(host)} (now {address}) and `ping {address}`; on {host}: "
                         f"`ss -ltn | grep {port}`, and open ports in the firewall",
                         {"reason": "timeout", "address": address, "port": port})
        except socket.gaierror as exc:
            return Check(self.link(agent), agent, host, f"tcp {which}", FAIL, f"cannot resolve {address}",
                         f"{address} does not resolve ({exc.strerror})",
                         f"set {self.addr_var(host)} (now {address}) to {host}'s IP address",
                         {"reason": "resolve", "address": address, "port": port})
        except OSError as exc:
            return Check(self.link(agent), agent, host, f"tcp {which}", FAIL, f"{exc.strerror or exc} ({where})",
                         f"cannot reach {where}: {exc.strerror or exc}: wrong address or link down",
                         f"check {self.addr_var(host)} (now {address}) and `ping {address}`; check the route "
                         f"(`ip route get {address}`)", {"reason": "unreachable", "address": address, "port": port})
        took = time.perf_counter() - started
        return Check(self.link(agent), agent, host, f"tcp {which}", PASS, f"{where} open ({_ms(took)})",
                     data={"address": address, "port": port, "connect_ms": round(took * 1000, 3)})

    # --- 2. CURVE ------------------------------------------------------------------------------

    def attempt(self, endpoint: str, keys: tuple[bytes, bytes, bytes] | None, timeout: float) -> Attempt:
        """mesh.ping on a fresh REQ socket, watching its handshake; stops at the first refused handshake."""
        from network.codec import ProtocolError, decode, encode
        from network.messages import Ping

        sock = self.ctx.socket(zmq.REQ)
        sock.linger = 0
        if keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                          | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
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

    def check_curve(self, agent: str) -> list[Check]:
        """The keyed ping (must be answered) and, with CURVE on, a throwaway key (must not be)."""
        host = self.cfg.host_of(agent)
        link = self.link(agent)
        endpoint = self.cfg.endpoint(agent, "rpc")
        where = endpoint.removeprefix("tcp://")
        me, out = self.me, []
        keys_fix = (f"`meshctl keys list` on both hosts (the {me} and {host} rows must show the same keys on both); "
                    f"copy "
                    f"keys/public/{me}.key to {host}'s keys/public/ and keys/public/{host}.key to {me}'s keys/public/, "
                    f"then restart both meshes ({self.up_cmd(me)} on {me}, {self.up_cmd(host)} on {host})")
        if not self.curve:
            attempt = self.attempt(endpoint, None, self.timeout)
            if attempt.outcome == "answered":
                status = FAIL if self.args.require_curve else WARN
                out.append(Check(link, agent, host, "curve", status, "CURVE off (plain text, anyone admitted)",
                                 f"CURVE is off on {me} (security.curve {self.cfg.security.curve}, no "
                                 f"{self.cfg.security.keys_dir}/private/{me}.key_secret): links are unencrypted and "
                                 f"unauthenticated",
                                 "meshctl keys generate mainpc pc2 (on one host), copy keys/public/*.key to both "
                                 "hosts and keys/private/<host>.key_secret to its own host only, restart both meshes",
                                 {"curve": False, "answered": True}))
            elif attempt.outcome in ("refused_auth", "handshake_failed"):
                out.append(Check(link, agent, host, "curve", FAIL, f"handshake refused ({attempt.detail})",
                                 f"{host} requires CURVE but it is off on {me} (no "
                                 f"{self.cfg.security.keys_dir}/private/"
                                 f"{me}.key_secret here)",
                                 f"put {me}'s key pair in {self.cfg.security.keys_dir} on {me} "
                                 f"(keys/private/{me}.key_secret "
                                 f"and keys/public/*.key, as made by `meshctl keys generate mainpc pc2`; or set "
                                 f"MESH_KEYS_DIR to where they are); `meshctl keys list` on both hosts must show the "
                                 f"same public keys", {"curve": False, "outcome": attempt.outcome}))
            else:
                out.append(self._silent(agent, attempt, curve=False))
            return out
        if self.identity is None:
            out.append(Check(link, agent, host, "curve", FAIL, "no key pair here", self.identity_error,
                             f"`meshctl keys generate {me}` on {me} (or copy its key pair from where it was "
                             f"made), copy "
                             f"keys/public/{me}.key to {host}, restart both meshes", {"curve": True}))
            return out
        from network.security import MissingKey
        try:
            keys = self.curve_keys(host)
        except MissingKey as exc:
            out.append(Check(link, agent, host, "curve", FAIL, f"no keys/public/{host}.key here", str(exc),
                             f"copy keys/public/{host}.key from {host} to {self.cfg.security.keys_dir}/public/ "
                             f"on {me}; "
                             f"`meshctl keys list` on both hosts", {"curve": True}))
            return out
        attempt = self.attempt(endpoint, keys, self.timeout)
        if attempt.outcome == "answered":
            out.append(Check(link, agent, host, "curve", PASS, f"keyed ping answered ({_ms(attempt.ms)})",
                             data={"curve": True, "answered": True, "ms": round(attempt.ms * 1000, 3)}))
        elif attempt.outcome == "refused_auth":
            out.append(Check(link, agent, host, "curve", FAIL, f"{host} refused {me}'s key ({attempt.detail})",
                             f"key mismatch: {host} refuses {me}'s public key: {host}'s keys/public/{me}.key is "
                             f"missing "
                             f"or not {me}'s current key (or {host}'s mesh started before it was copied)",
                             keys_fix, {"curve": True, "outcome": attempt.outcome}))
        elif attempt.outcome == "handshake_failed":
            plain = self.attempt(endpoint, None, min(self.timeout, 1.0))
            if plain.outcome == "answered":
                cause = (f"{host} runs without CURVE (no keys/private/{host}.key_secret there, or security.curve off) "
                         f"while {me} has it on")
                fix = (f"on {host}: put its key pair in keys/ (keys/private/{host}.key_secret and keys/public/*.key, "
                       f"as made by `meshctl keys generate mainpc pc2`), then {self.up_cmd(host)}")
            else:
                server_key = keys[2].decode()
                cause = (f"key mismatch: the CURVE handshake with {where} fails ({attempt.detail}): "
                         f"keys/public/{host}.key on {me} ({server_key[:10]}...) is not the key {host} runs with "
                         f"(regenerated with --force? a different keys dir on {host}?)")
                fix = keys_fix
            out.append(Check(link, agent, host, "curve", FAIL, f"handshake failed ({attempt.detail})", cause, fix,
                             {"curve": True, "outcome": attempt.outcome}))
        else:
            out.append(self._silent(agent, attempt, curve=True))
        if out[-1].status != PASS:
            return out
        # a throwaway key pair must be refused
        public, secret = zmq.curve_keypair()
        rogue = self.attempt(endpoint, (public, secret, keys[2]), self.timeout)
        if rogue.outcome == "answered":
            out.append(Check(link, agent, host, "curve: unknown key", FAIL, "a throwaway key was answered",
                             f"{host} admits clients with unknown keys: its CURVE authenticator does not restrict keys "
                             f"(its keys dir holds unexpected public keys, or the agent runs without ZAP)",
                             f"on {host}: `meshctl keys list` must show only the mesh's hosts; remove other keys from "
                             f"keys/public/, restart: {self.up_cmd(host)}", {"outcome": rogue.outcome}))
        else:
            how = {"refused_auth": f"refused ({rogue.detail}) in {_ms(rogue.ms)}",
                   "handshake_failed": f"refused ({rogue.detail}) in {_ms(rogue.ms)}"}.get(
                rogue.outcome, f"no answer within {self.timeout:g}s")
            out.append(Check(link, agent, host, "curve: unknown key", PASS, how,
                             data={"outcome": rogue.outcome, "ms": round(rogue.ms * 1000, 3)}))
        return out

    def _silent(self, agent: str, attempt: Attempt, *, curve: bool) -> Check:
        host = self.cfg.host_of(agent)
        where = self.cfg.endpoint(agent, "rpc").removeprefix("tcp://")
        if attempt.outcome == "no_reply":
            cause = (f"{where} completes the handshake but {agent} does not answer mesh.ping within {self.timeout:g}s: "
                     f"the agent is hung or overloaded")
            fix = f"on {host}: `meshctl status`, `meshctl logs {agent}`; restart it: {self.up_cmd(host)}"
        else:
            cause = (f"TCP connects to {where} but no {'CURVE' if curve else 'ZMTP'} handshake within "
                     f"{self.timeout:g}s: "
                     f"the agent is hung, or something else listens there (wrong address?)"
                     + (" or the keys do not match" if curve else ""))
            fix = (f"check {self.addr_var(host)} (now {self.addr(host)}); on {host}: `meshctl status`, "
                   f"`meshctl logs {agent}`" + (", `meshctl keys list` on both hosts" if curve else ""))
        return Check(self.link(agent), agent, host, "curve", FAIL, f"no answer within {self.timeout:g}s", cause, fix,
                     {"curve": curve, "outcome": attempt.outcome})

    # --- 3 + 4. request/reply and clock --------------------------------------------------------

    def check_rpc(self, agent: str) -> list[Check]:
        from network.codec import ProtocolError, decode, encode
        from network.messages import Ping, Pong

        host = self.cfg.host_of(agent)
        link, n = self.link(agent), self.args.probes
        rtts: list[float] = []
        skews: list[tuple[float, float]] = []  # (rtt, skew)
        timeouts = errors = sent = 0
        state = ""
        with self.client(agent) as c:
            def ping() -> tuple[bytes | None, bytes, float, float, float, float]:
                mid, frame = encode(Ping(), sender=SENDER)
                t0, p0 = time.time(), time.perf_counter()
                raw = c.send_raw([frame], timeout=self.timeout)
                return raw, mid, t0, p0, time.perf_counter(), time.time()

            # a crawling link must not take N x timeout
            budget_end = time.perf_counter() + RPC_BUDGET_TIMEOUTS * self.timeout
            if ping()[0] is None:  # the first ping connects and handshakes: not measured, but its timeout counts
                sent, timeouts = 1, 1
            while sent < n and timeouts < MAX_PROBE_TIMEOUTS and time.perf_counter() < budget_end:
                raw, mid, t0, p0, p1, t1 = ping()
                sent += 1
                if raw is None:
                    timeouts += 1
                    continue
                try:
                    env = decode(raw)
                except ProtocolError:
                    errors += 1
                    continue
                if env.cid != mid or not isinstance(env.message, Pong):
                    errors += 1
                    continue
                state = env.message.state
                rtts.append(p1 - p0)
                skews.append((p1 - p0, env.ts - (t0 + t1) / 2))
        out = []
        where = self.cfg.endpoint(agent, "rpc").removeprefix("tcp://")
        counts = f"{len(rtts)}/{sent} answered" + (f", {timeouts} timed out" if timeouts else "") + (
            f", {errors} bad replies" if errors else "")
        data = {"sent": sent, "answered": len(rtts), "timeouts": timeouts, "errors": errors, "state": state}
        if rtts:
            p50, p99 = statistics.median(rtts), _percentile(rtts, 0.99)
            data.update(p50_ms=round(p50 * 1000, 3), p99_ms=round(p99 * 1000, 3), max_ms=round(max(rtts) * 1000, 3))
        if rtts and not timeouts and not errors and sent == n:
            value = f"p50 {_ms(p50)}, p99 {_ms(p99)} ({counts})"
            p90 = _percentile(rtts, 0.9)
            if p90 > JITTER_WARN_S and p90 > 10 * p50:  # p90, not p99: one scheduling hiccup is not a sick link
                out.append(Check(link, agent, host, "rpc", WARN, value,
                                 f"every ping was answered, but one in ten took over {_ms(p90)} against a median of "
                                 f"{_ms(p50)}: TCP retransmits (packet loss) or congestion on the link to {host}",
                                 f"`ping -c 100 {self.addr(host)}` for loss; check cables, Wi-Fi, switch", data))
            else:
                out.append(Check(link, agent, host, "rpc", PASS, value, data=data))
        else:
            value = (f"p50 {_ms(p50)}, p99 {_ms(p99)} ({counts})" if rtts else counts)
            if timeouts and not rtts:
                cause = f"{agent} at {where} stopped answering mesh.ping (no reply within {self.timeout:g}s)"
            elif not timeouts and not errors:
                cause = (f"the link to {host} is too slow: only {sent} of {n} round trips in "
                         f"{RPC_BUDGET_TIMEOUTS * self.timeout:g}s: packet loss (TCP retransmits) or congestion")
            elif timeouts:
                cause = (f"{timeouts} of {sent} mesh.ping to {where} got no reply within {self.timeout:g}s: a lossy or "
                         f"flapping link, or {agent} stalls")
            else:
                cause = f"{errors} of {sent} replies from {where} were not a pong to the request"
            if sent < n and timeouts:
                cause += f" (stopped after {timeouts} timeout(s), {sent} of {n} sent)"
            fix = (f"`ping -c 20 {self.addr(host)}` for loss; on {host}: `meshctl status`, `meshctl logs {agent}`")
            out.append(Check(link, agent, host, "rpc", FAIL, value, cause, fix, data))
        # clock skew from the envelope timestamps (the remote's ts against the midpoint of our send and receive)
        if skews:
            skew = statistics.median(s for _, s in skews)
            bound = statistics.median(r for r, _ in skews) / 2
            sign = "ahead of" if skew > 0 else "behind"
            value = f"{skew * 1000:+.2f} ms (±{bound * 1000:.2f} ms, median of {len(skews)})"
            cdata = {"skew_s": round(skew, 6), "uncertainty_s": round(bound, 6), "max_skew_s": self.args.max_skew}
            if abs(skew) > self.args.max_skew:
                out.append(Check(link, agent, host, "clock", FAIL, value,
                                 f"{host}'s clock is {_secs(abs(skew))} {sign} {self.me}'s (limit "
                                 f"{self.args.max_skew:g}s): "
                                 f"heartbeat ages and event times disagree across hosts",
                                 "enable NTP on both hosts: `timedatectl set-ntp true` (then `timedatectl status` must "
                                 "say 'System clock synchronized: yes')", cdata))
            else:
                out.append(Check(link, agent, host, "clock", PASS, value, data=cdata))
        else:
            out.append(Check(link, agent, host, "clock", SKIP, "not run: no replies to measure"))
        return out

    # --- 5. pub/sub ----------------------------------------------------------------------------

    def check_pubsub_in(self, agent: str) -> Check:
        """remote probe publishes -> we receive: subscribe to its pub port, make it echo until an event comes."""
        from network.messages import Echo
        from network.metrics import MeshMetrics
        from network.pubsub import Subscriber
        from network.rpc import MeshError
        from network.security import Guard

        host = self.cfg.host_of(agent)
        name = f"pub/sub {host}->{self.me}"
        pub = self.cfg.endpoint(agent, "pub").removeprefix("tcp://")
        got: list[float] = []
        seq0 = random.randrange(1 << 30)

        def on_event(topic: str, env) -> None:
            if env.sender == agent and topic == "probe.echo" and getattr(env.message, "seq", -1) >= seq0:
                got.append(time.perf_counter())

        guard = Guard(self.ctx, self.identity)
        sub = Subscriber(self.ctx, on_event, metrics=MeshMetrics(SENDER, "tool"), guard=guard,
                         max_frame_bytes=self.cfg.mesh.max_frame_bytes)
        sends = 0
        error = error_code = ""
        started = time.perf_counter()
        try:
            sub.connect(self.cfg.endpoint(agent, "pub"), host)
            sub.subscribe("probe.")
            poller = zmq.Poller()
            poller.register(sub.socket, zmq.POLLIN)
            deadline = started + self.timeout
            with self.client(agent) as c:
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
            return Check(self.link(agent), agent, host, name, PASS, f"event in {_ms(took)} ({sends} echo(s) sent)",
                         data={"ms": round(took * 1000, 3), "sends": sends})
        if error:
            return Check(self.link(agent), agent, host, name, FAIL, f"mesh.echo failed ({error_code})",
                         *self._request_failed(agent, "mesh.echo", error_code, error), {"sends": sends})
        return Check(self.link(agent), agent, host, name, FAIL, f"no event within {self.timeout:g}s ({sends} echo(s))",
                     f"{agent} answered {sends} echo(s) but none of its events arrived from {pub}: the pub port is "
                     f"blocked (firewall on {host}), its CURVE refuses {self.me}'s subscriber, or the link is lossy",
                     f"on {host}: open port {self.cfg.port(agent, 'pub')} in the firewall; `meshctl logs {agent}` "
                     f"for 'refused a subscriber'; `meshctl keys list` on both hosts", {"sends": sends})

    def _request_failed(self, agent: str, what: str, code: str, message: str, *, local: str = "") -> tuple[str, str]:
        """(cause, fix) for a probe request that failed, by error code."""
        host = self.cfg.host_of(agent)
        if code == "timeout":
            return (f"{what} got no reply within {self.timeout:g}s although mesh.ping did: the link is lossy or "
                    f"congested, or the agent stalls ({message})",
                    f"`ping -c 50 {self.addr(host)}` for loss; on {host}: `meshctl logs {agent}`; run this again")
        if code == "unknown_agent":
            return (f"{host}'s config does not declare {local}: the two hosts run different mesh configs",
                    "use the same config/mesh.yaml on both hosts; restart both meshes")
        if code in ("no_handler", "unknown_type"):
            return (f"{agent} does not handle {what} ({code}): it is not of kind probe on {host}, or {host} runs an "
                    f"older agent-mesh", f"update agent-mesh on {host} and use the same config/mesh.yaml on both hosts")
        return f"{agent} answered {what} with {code}: {message}", f"on {host}: `meshctl logs {agent}`"

    def check_pubsub_out(self, agent: str) -> Check:
        """our probe publishes -> the remote probe receives: probe.watch, echoes to ours, probe.report until counted."""
        from agents.probe import ProbeCounts, ProbeReport, ProbeWatch
        from network.messages import Echo
        from network.rpc import MeshError

        host = self.cfg.host_of(agent)
        name = f"pub/sub {self.me}->{host}"
        local = self.local_probe
        started = time.perf_counter()
        deadline = started + self.timeout
        sends = 0
        with self.client(agent) as remote, self.client(local) as mine:
            try:
                remote.request(ProbeWatch(agent=local), timeout=self.timeout)
                base = remote.request(ProbeReport(agent=local), timeout=self.timeout)
            except MeshError as exc:
                return Check(self.link(agent), agent, host, name, FAIL, f"probe.watch failed ({exc.code})",
                             *self._request_failed(agent, "probe.watch", exc.code, exc.message, local=local))
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
                        return Check(self.link(agent), agent, host, name, PASS,
                                     f"{agent} received {counts.received - base.received} event(s) in {_ms(took)} "
                                     f"({sends} echo(s) sent)",
                                     data={"ms": round(took * 1000, 3), "sends": sends,
                                           "received": counts.received - base.received})
            except MeshError as exc:
                return Check(self.link(agent), agent, host, name, FAIL, f"echo / probe.report failed ({exc.code})",
                             *self._request_failed(agent, "mesh.echo / probe.report", exc.code, exc.message,
                                                   local=local))
        mine_pub = self.cfg.endpoint(local, "pub").removeprefix("tcp://")
        return Check(self.link(agent), agent, host, name, FAIL, f"0 events within {self.timeout:g}s ({sends} "
                                                                f"published)",
                     f"{agent} on {host} received none of {local}'s events from {mine_pub}: {host} cannot reach "
                     f"{self.me}'s pub port (firewall on {self.me}, or {self.addr_var(self.me)} on {host} is not "
                     f"{self.addr(self.me)}), or {self.me} refuses {host}'s key",
                     f"on {host}: `nc -vz {self.addr(self.me)} {self.cfg.port(local, 'pub')}` and check "
                     f"{self.addr_var(self.me)} there; open ports on {self.me}'s firewall; `meshctl logs {local}` on "
                     f"{self.me} for 'refused a subscriber'", {"sends": sends})

    def check_local_probe(self) -> Check:
        """The local probe must answer (it publishes for pub/sub out)."""
        local = self.local_probe
        attempt, value, cause, fix = self.diagnose_local(local)
        if attempt is not None and attempt.outcome == "answered":
            state = getattr(attempt.message, "state", "?")
            return Check(self.link(local), local, self.me, "rpc", PASS, f"pong in {_ms(attempt.ms)}, {state}",
                         data={"ms": round(attempt.ms * 1000, 3), "state": state})
        return Check(self.link(local), local, self.me, "rpc", FAIL, value, cause, fix)

    def diagnose_local(self, agent: str) -> tuple[Attempt | None, str, str, str]:
        """Pings an agent of this host; when it does not answer, says why: (attempt, value, cause, fix)."""
        from network.security import MissingKey

        endpoint = self.cfg.endpoint(agent, "rpc")
        where = endpoint.removeprefix("tcp://")
        tcp = self.check_tcp(agent, "rpc")
        if tcp.data.get("reason") == "refused":
            return (None, tcp.value, f"the mesh is not running on this host: nothing listens on {where} ({agent})",
                    f"start it here: {self.up_cmd(self.me)}")
        if tcp.status != PASS:
            return (None, tcp.value, f"{agent} of this host is not reachable at {where} ({tcp.value}): "
                    f"{self.addr_var(self.me)} "
                    f"(now {self.addr(self.me)}) is not this host's address?",
                    f"set {self.addr_var(self.me)} to this host's address (`ip -br addr`), then {self.up_cmd(self.me)}")
        try:
            keys = self.curve_keys(self.me) if self.curve else None
        except MissingKey as exc:
            return None, "no CURVE key", str(exc), self.key_fix()
        if self.curve and keys is None:
            return None, "no CURVE key", self.identity_error, self.key_fix()
        attempt = self.attempt(endpoint, keys, self.timeout)
        if attempt.outcome == "answered":
            return attempt, "", "", ""
        if attempt.outcome in ("refused_auth", "handshake_failed"):
            value = f"handshake failed ({attempt.detail})"
            if self.curve and self.attempt(endpoint, None, min(self.timeout, 1.0)).outcome == "answered":
                return (attempt, value, f"the mesh on this host runs without CURVE although "
                                        f"{self.cfg.security.keys_dir} "
                        f"holds {self.me}'s key pair (it started before the keys were made, or with another keys dir "
                        f"/ MESH_KEYS_DIR)",
                        f"restart the mesh here with these keys (Ctrl-C, then {self.up_cmd(self.me)} with the same "
                        f"MESH_KEYS_DIR); its agents must log `curve on`")
            if not self.curve:
                return (attempt, value, f"the mesh here runs with CURVE but this check has no key: CURVE is off for "
                        f"{self.me} in {self.config_arg} ({attempt.detail})",
                        f"run this check with the same config and MESH_KEYS_DIR as the mesh ({self.up_cmd(self.me)})")
            return (attempt, value, f"key mismatch on this host: the running mesh uses another key pair than "
                    f"{self.cfg.security.keys_dir} holds now (keys regenerated or replaced after it started?) "
                    f"({attempt.detail})",
                    f"restart the mesh here so that it reads the current keys (Ctrl-C, then {self.up_cmd(self.me)}); "
                    f"then `meshctl keys list` on both hosts and copy keys/public/{self.me}.key to the other host")
        return (attempt, f"no answer within {self.timeout:g}s",
                f"{agent} accepts connections on {where} but does not answer within {self.timeout:g}s: it is "
                f"hung (or something else listens there)",
                f"`meshctl status`, `meshctl logs {agent}`; restart the mesh here: {self.up_cmd(self.me)}")

    # --- 6. twin -------------------------------------------------------------------------------

    def check_twin(self) -> list[Check]:
        from agents.control import fetch_status
        from network.rpc import MeshError
        from network.security import MissingKey

        twin = self.cfg.twin
        host = self.cfg.host_of(twin)
        where = self.cfg.endpoint(twin, "rpc").removeprefix("tcp://")
        out = []
        if host == self.me:  # cheap and precise first: is the twin of this host listening and answering at all?
            attempt, value, cause, fix = self.diagnose_local(twin)
            if attempt is None or attempt.outcome != "answered":
                if "not running on this host" in cause:
                    cause = "twin not running: " + cause
                return [Check(self.link(twin), twin, host, "twin", FAIL, value, cause, fix)]
        started = time.perf_counter()
        try:
            status = fetch_status(self.cfg, timeout=self.timeout)
        except MissingKey as exc:
            return [Check(self.link(twin), twin, host, "twin", FAIL, "no CURVE key", str(exc), self.key_fix())]
        except MeshError as exc:
            if host == self.me:
                out.append(Check(self.link(twin), twin, host, "twin", FAIL, f"no twin.status reply ({exc.code})",
                                 f"{twin} answers mesh.ping but not twin.status: {exc.message}",
                                 f"`meshctl logs {twin}`; restart the mesh here: {self.up_cmd(host)}"))
            else:
                # only called once the twin answered mesh.ping: it runs, so the link or the twin itself is slow
                out.append(Check(self.link(twin), twin, host, "twin", FAIL, f"no twin.status reply ({exc.code})",
                                 f"{twin} answers mesh.ping but not twin.status within {self.timeout:g}s at {where}: "
                                 f"the link is lossy or the twin stalls ({exc.message})",
                                 f"`ping -c 50 {self.addr(host)}` for loss; on {host}: `meshctl logs {twin}`; if it "
                                 f"hangs, restart the mesh there: {self.up_cmd(host)}"))
            return out
        took = time.perf_counter() - started
        ready = sum(a.state == "ready" for a in status.agents)
        out.append(Check(self.link(twin), twin, host, "twin", PASS,
                         f"mesh {status.mesh}: {status.mesh_state}, {ready}/{len(status.agents)} ready ({_ms(took)})",
                         data={"ms": round(took * 1000, 3), "mesh_state": status.mesh_state}))
        # every agent across the link (not on the twin's host) as the twin sees it
        across = {a.agent: a for a in status.agents if a.host != host}
        if not across:
            return out
        others = sorted({a.host for a in across.values()})
        link = f"{', '.join(others)} agents -> {twin}@{host}"
        bad = {n: a for n, a in across.items() if a.state != "ready"}
        states = {n: a.state for n, a in across.items()}
        if not bad:
            out.append(Check(link, twin, host, "twin view", PASS, f"{len(across)}/{len(across)} ready: "
                             + ", ".join(across), data={"states": states}))
            return out
        causes, fixes = [], []
        for name, a in bad.items():
            h = a.host
            if a.state == "declared":
                causes.append(f"{name} never registered with the twin: {h}'s mesh is not running, or {h} cannot reach "
                              f"the twin at {where}")
                fixes.append(f"on {h}: {self.up_cmd(h)}; check {self.addr_var(host)} there (now {self.addr(host)} "
                             f"here) "
                             f"and `nc -vz {self.addr(host)} {self.cfg.port(twin, 'rpc')}`")
            elif a.state == "stopped":
                causes.append(f"{name} stopped (deregistered): {h}'s mesh was stopped (or, started again, its agents "
                              f"cannot register: see the rows above)")
                fixes.append(f"on {h}: {self.up_cmd(h)}")
            elif a.state == "unreachable":
                age = f" for {a.last_heartbeat_age_s:.1f}s" if a.last_heartbeat_age_s is not None else ""
                causes.append(f"{name} is unreachable: no agent of {h} has heartbeated{age}: the link between {h} and "
                              f"{host} is down, or {h} itself is down or hung")
                fixes.append(f"`ping {self.addr(h)}` from {host} and `ping {self.addr(host)}` from {h}; on {h}: "
                             f"`meshctl status`, `meshctl logs {name}`")
            elif a.state == "dead":
                age = f" for {a.last_heartbeat_age_s:.1f}s" if a.last_heartbeat_age_s is not None else ""
                causes.append(f"{name} is dead: no heartbeat{age} while other agents of {h} are fine: it crashed or "
                              f"hangs")
                fixes.append(f"on {h}: `meshctl logs {name}` (the supervisor restarts it; if not, {self.up_cmd(h)})")
            else:
                why = ", ".join(a.waiting_on) if a.waiting_on else a.detail
                causes.append(f"{name} is {a.state}" + (f" ({why})" if why else ""))
                fixes.append(f"on {h}: `meshctl status`, `meshctl logs {name}`")
        only_degraded = all(a.state == "degraded" for a in bad.values())
        value = ", ".join(f"{n} {a.state}" for n, a in bad.items())
        out.append(Check(link, twin, host, "twin view", WARN if only_degraded else FAIL,
                         f"{len(across) - len(bad)}/{len(across)} ready; {value}", "; ".join(causes),
                         "; ".join(dict.fromkeys(fixes)), {"states": states}))
        return out

    # --- the run -------------------------------------------------------------------------------

    def guarded(self, agent: str, check: str, fn, *args) -> list[Check]:
        """Runs one check; an unexpected error becomes a failed row instead of ending the whole run."""
        try:
            out = fn(*args)
        except Exception as exc:  # a bug or an odd answer must not hide every other result
            host = self.cfg.host_of(agent) if agent else self.me
            return [Check(self.link(agent) if agent else self.me, agent, host, check, FAIL, f"error: "
                                                                                            f"{type(exc).__name__}",
                          f"the check itself failed: {type(exc).__name__}: {exc}",
                          "run it again; if it repeats, report it with the output of --json")]
        return out if isinstance(out, list) else [out]

    def run(self) -> list[Check]:
        cfg = self.cfg
        # TCP: every port of every remote agent at once, so dead links cost one timeout, not one per port
        targets = [(a, w) for a in self.remote for w in ("rpc", "pub", "metrics")]
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(targets)))) as pool:
            tcp = dict(zip(targets, pool.map(lambda t: self.check_tcp(*t), targets), strict=True))
        # a host whose every rpc port refuses: the mesh is not running there
        for host in {cfg.host_of(a) for a in self.remote}:
            rpcs = [tcp[(a, "rpc")] for a in self.remote if cfg.host_of(a) == host]
            if rpcs and all(c.data.get("reason") == "refused" for c in rpcs):
                for c in tcp.values():
                    if c.host == host and c.data.get("reason") == "refused":
                        c.cause = (f"nothing listens on {c.data['address']}:{c.data['port']}: the mesh is not running "
                                   f"on {host} (no agent of {host} accepts connections)")
                        c.fix = f"start the mesh on {host}: {self.up_cmd(host)}"
        reachable = [a for a in self.remote if tcp[(a, "rpc")].status == PASS]
        # CURVE: one handshake per reachable agent, in parallel too
        with ThreadPoolExecutor(max_workers=max(1, len(reachable))) as pool:
            curve = dict(zip(reachable, pool.map(lambda a: self.guarded(a, "curve", self.check_curve, a), reachable),
                             strict=True))

        local_probe = self.guarded(self.local_probe, "rpc", self.check_local_probe)[0] if self.local_probe else None
        twin, twin_host = cfg.twin, cfg.host_of(cfg.twin)
        for agent in self.remote:
            host = cfg.host_of(agent)
            for which in ("rpc", "pub", "metrics"):
                self.results.append(tcp[(agent, which)])
            probe = cfg.agents[agent].kind in PROBE_KINDS
            planned = ["curve", "rpc", "clock"]
            if probe:
                planned += [f"pub/sub {host}->{self.me}", f"pub/sub {self.me}->{host}"]
            if agent == twin:
                planned.append("twin")
            if agent not in curve:
                for name in planned:
                    if name == "twin" and tcp[(agent, "rpc")].data.get("reason") == "refused":
                        where = f"{self.addr(host)}:{cfg.port(agent, 'rpc')}"
                        self.add(agent, host, "twin", FAIL, "no twin.status reply (refused)",
                                 f"twin not running on {host}: nothing listens on {where}",
                                 f"on {host}: {self.up_cmd(host)}")
                    else:
                        self.add(agent, host, name, SKIP, f"not run: {agent}'s rpc port is unreachable")
                continue
            self.results.extend(curve[agent])
            if not curve[agent][0].data.get("answered"):  # CURVE off under --require-curve still answers
                for name in planned[1:]:
                    if name == "twin" and curve[agent][0].data.get("outcome") in ("no_handshake", "no_reply"):
                        self.add(agent, host, "twin", FAIL, f"no answer within {self.timeout:g}s",
                                 f"twin not running properly on {host}: it accepts connections on "
                                 f"{self.addr(host)}:{cfg.port(agent, 'rpc')} but answers nothing (hung)",
                                 f"on {host}: `meshctl logs {agent}`; restart the mesh there: {self.up_cmd(host)}")
                    else:
                        self.add(agent, host, name, SKIP, "not run: no mesh.ping answered (see curve)")
                continue
            self.results.extend(self.guarded(agent, "rpc", self.check_rpc, agent))
            if probe:
                if tcp[(agent, "pub")].status == PASS:
                    self.results.extend(self.guarded(agent, planned[3], self.check_pubsub_in, agent))
                else:
                    self.add(agent, host, planned[3], SKIP, f"not run: {agent}'s pub port is unreachable")
                if local_probe is None:
                    self.add(agent, host, planned[4], SKIP, f"not run: no probe agent on {self.me}")
                elif local_probe.status != PASS:
                    self.add(agent, host, planned[4], SKIP, f"not run: {self.local_probe} does not answer")
                else:
                    self.results.extend(self.guarded(agent, planned[4], self.check_pubsub_out, agent))
            if agent == twin:
                self.results.extend(self.guarded(twin, "twin", self.check_twin))
        if local_probe is not None:
            self.results.append(local_probe)
        if twin_host == self.me:
            self.results.extend(self.guarded(twin, "twin", self.check_twin))
        # hosts without a probe: pub/sub to and from them is not checked
        for host in [self.me, *sorted({cfg.host_of(a) for a in self.remote})]:
            if not any(cfg.agents[a].kind in PROBE_KINDS for a in cfg.agents_on(host)):
                self.add("", host, "probe", WARN, f"no probe agent on {host}",
                         f"{host} has no agent of kind probe, so pub/sub to and from {host} is not checked",
                         f"declare one in config/mesh.yaml: `probe-{host}: {{kind: probe, depends_on: [twin], "
                         f"required: "
                         f"false}}` and list it in a group of host {host}", link=f"{self.me} -> {host}")
        return self.results

    def close(self) -> None:
        self.ctx.destroy(linger=0)  # every socket was closed by its check; destroy() also covers one that was not


# --- output ------------------------------------------------------------------------------------


def print_table(me: str, checks: list[Check], elapsed: float, cfg_path: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120  # piped: do not squeeze into 80
    console = Console(highlight=False, width=wide)
    ok = not any(c.status == FAIL for c in checks)
    table = Table(title=f"connectivity from {me} ({cfg_path})", title_justify="left")
    for col in ("link", "check", "result", "value"):
        table.add_column(col, overflow="fold")
    last = None
    for c in checks:
        table.add_row(escape(c.link) if c.link != last else "", escape(c.check),
                      f"[{STYLE[c.status]}]{c.status.upper()}[/]", escape(c.value))
        last = c.link
    console.print(table)
    problems = [c for c in checks if c.status in (FAIL, WARN) and (c.cause or c.fix)]
    for i, c in enumerate(problems):
        console.print(f"[{STYLE[c.status]}]{c.status.upper()}[/] {escape(c.link)} [bold]{escape(c.check)}[/]: "
                      f"{escape(c.cause)}", soft_wrap=True)
        if c.fix and (i + 1 == len(problems) or problems[i + 1].fix != c.fix):  # one fix under a run of equal ones
            console.print(f"    fix: {escape(c.fix)}", soft_wrap=True)
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, WARN, SKIP)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    verdict = "[bold green]OK[/]: the hosts can work together" if ok else "[bold red]FAILED[/]"
    console.print(f"{verdict} ({summary}; {elapsed:.1f}s)", soft_wrap=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Checks every link between this host and the other host(s) of the mesh.")
    p.add_argument("--from", dest="from_", metavar="{mainpc,pc2}", default=None,
                   help="the host this runs on (default mainpc, or the --config file's host:)")
    p.add_argument("--config", help="mesh config (default config/<from>.yaml)")
    p.add_argument("--probes", type=int, default=50, help="mesh.ping round trips per link (default 50)")
    p.add_argument("--json", action="store_true", help="print a machine-readable report instead of the table")
    p.add_argument("--timeout", type=float, default=2.0, help="per-check timeout in seconds (default 2.0)")
    p.add_argument("--max-skew", type=float, default=0.5, help="largest clock skew allowed, seconds (default 0.5)")
    p.add_argument("--require-curve", action="store_true", help="CURVE off is a failure, not a warning")
    p.add_argument("--deadline", type=float, default=120.0,
                   help="hard limit for the whole run in seconds: past it, every thread's stack is printed and the "
                        "run exits 1 (default 120)")
    args = p.parse_args(argv)
    if args.probes < 1:
        p.error("--probes must be at least 1")
    if not 0 < args.timeout <= 60:
        p.error("--timeout must be in (0, 60]")
    if args.max_skew < 0:
        p.error("--max-skew must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config:
        path, shown = Path(args.config), args.config
    else:
        host = args.from_ or "mainpc"
        shown = f"config/{host}.yaml"
        path = Path(shown) if Path(shown).exists() else ROOT / shown
    try:
        cfg = load_config(path, host=args.from_)
        me = cfg.this_host
    except ConfigError as exc:
        print(f"config error\n{exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"from": args.from_, "config": shown, "ok": False, "error": str(exc), "checks": []}))
        return 2
    # Every check has its own timeout; this is the backstop that keeps a run from ever hanging,
    # and says where it was stuck if it does.
    faulthandler.dump_traceback_later(args.deadline, exit=True)
    started = time.perf_counter()
    conn = Connectivity(cfg, args, shown)
    try:
        checks = conn.run()
    finally:
        conn.close()
    elapsed = time.perf_counter() - started
    ok = not any(c.status == FAIL for c in checks)
    if args.json:
        print(json.dumps({"from": me, "config": shown, "ok": ok, "elapsed_s": round(elapsed, 3),
                          "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print_table(me, checks, elapsed, shown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
