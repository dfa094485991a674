"""3 + 4. Request/reply: N mesh.ping round trips (p50 / p99), and the remote's clock against ours
from the replies' envelope timestamps."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from network.codec import ProtocolError, decode, encode
from network.messages import Ping, Pong
from network.rpc import RpcClient
from ops.connectivity.report import FAIL, PASS, SKIP, WARN, Check, fmt_ms, fmt_secs, percentile
from ops.connectivity.session import SENDER, Session

MAX_PROBE_TIMEOUTS = 3  # stop the round-trip series after this many timeouts: a dead link must not cost N x timeout
RPC_BUDGET_TIMEOUTS = 3  # and after this many --timeout's in all, however slowly the replies come
JITTER_WARN_S = 0.25  # a p90 round trip above this (and 10x the median) is a warning: retransmits


@dataclass
class Series:
    """What a series of mesh.ping measured."""

    sent: int = 0
    timeouts: int = 0
    errors: int = 0
    state: str = ""  # the agent's state in its last pong
    rtts: list[float] = field(default_factory=list)
    skews: list[tuple[float, float]] = field(default_factory=list)  # (rtt, skew)


def check_rpc(s: Session, agent: str) -> list[Check]:
    """The round-trip row and the clock row of one agent."""
    series = ping_series(s, agent)
    return [_rpc_check(s, agent, series), _clock_check(s, agent, series)]


def _ping(s: Session, c: RpcClient) -> tuple[bytes | None, bytes, float, float, float, float]:
    """One mesh.ping: (raw reply or None, its id, wall clock sent, perf sent, perf received, wall clock received)."""
    mid, frame = encode(Ping(), sender=SENDER)
    t0, p0 = time.time(), time.perf_counter()
    raw = c.send_raw([frame], timeout=s.timeout)
    return raw, mid, t0, p0, time.perf_counter(), time.time()


def ping_series(s: Session, agent: str) -> Series:
    """Up to --probes mesh.ping, ending early after MAX_PROBE_TIMEOUTS timeouts or RPC_BUDGET_TIMEOUTS x --timeout."""
    m = Series()
    with s.client(agent) as c:
        # a crawling link must not take N x timeout
        budget_end = time.perf_counter() + RPC_BUDGET_TIMEOUTS * s.timeout
        if _ping(s, c)[0] is None:  # the first ping connects and handshakes: not measured, but its timeout counts
            m.sent, m.timeouts = 1, 1
        while m.sent < s.opts.probes and m.timeouts < MAX_PROBE_TIMEOUTS and time.perf_counter() < budget_end:
            raw, mid, t0, p0, p1, t1 = _ping(s, c)
            m.sent += 1
            if raw is None:
                m.timeouts += 1
                continue
            try:
                env = decode(raw)
            except ProtocolError:
                m.errors += 1
                continue
            if env.cid != mid or not isinstance(env.message, Pong):
                m.errors += 1
                continue
            m.state = env.message.state
            m.rtts.append(p1 - p0)
            m.skews.append((p1 - p0, env.ts - (t0 + t1) / 2))
    return m


def _rpc_check(s: Session, agent: str, m: Series) -> Check:
    host = s.cfg.host_of(agent)
    link, n = s.link(agent), s.opts.probes
    rtts, sent, timeouts, errors = m.rtts, m.sent, m.timeouts, m.errors
    where = s.rpc_where(agent)
    counts = f"{len(rtts)}/{sent} answered" + (f", {timeouts} timed out" if timeouts else "") + (
        f", {errors} bad replies" if errors else "")
    data = {"sent": sent, "answered": len(rtts), "timeouts": timeouts, "errors": errors, "state": m.state}
    if rtts:
        p50, p99 = statistics.median(rtts), percentile(rtts, 0.99)
        data.update(p50_ms=round(p50 * 1000, 3), p99_ms=round(p99 * 1000, 3), max_ms=round(max(rtts) * 1000, 3))
    if rtts and not timeouts and not errors and sent == n:
        value = f"p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)} ({counts})"
        p90 = percentile(rtts, 0.9)
        if p90 > JITTER_WARN_S and p90 > 10 * p50:  # p90, not p99: one scheduling hiccup is not a sick link
            return Check(link, agent, host, "rpc", WARN, value,
                         f"every ping was answered, but one in ten took over {fmt_ms(p90)} against a median of "
                         f"{fmt_ms(p50)}: TCP retransmits (packet loss) or congestion on the link to {host}",
                         f"`ping -c 100 {s.addr(host)}` for loss; check cables, Wi-Fi, switch", data)
        return Check(link, agent, host, "rpc", PASS, value, data=data)
    value = (f"p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)} ({counts})" if rtts else counts)
    if timeouts and not rtts:
        cause = f"{agent} at {where} stopped answering mesh.ping (no reply within {s.timeout:g}s)"
    elif not timeouts and not errors:
        cause = (f"the link to {host} is too slow: only {sent} of {n} round trips in "
                 f"{RPC_BUDGET_TIMEOUTS * s.timeout:g}s: packet loss (TCP retransmits) or congestion")
    elif timeouts:
        cause = (f"{timeouts} of {sent} mesh.ping to {where} got no reply within {s.timeout:g}s: a lossy or "
                 f"flapping link, or {agent} stalls")
    else:
        cause = f"{errors} of {sent} replies from {where} were not a pong to the request"
    if sent < n and timeouts:
        cause += f" (stopped after {timeouts} timeout(s), {sent} of {n} sent)"
    fix = (f"`ping -c 20 {s.addr(host)}` for loss; on {host}: `meshctl status`, `meshctl logs {agent}`")
    return Check(link, agent, host, "rpc", FAIL, value, cause, fix, data)


def _clock_check(s: Session, agent: str, m: Series) -> Check:
    """Clock skew from the envelope timestamps (the remote's ts against the midpoint of our send and receive)."""
    host, link = s.cfg.host_of(agent), s.link(agent)
    if not m.skews:
        return Check(link, agent, host, "clock", SKIP, "not run: no replies to measure")
    skew = statistics.median(sk for _, sk in m.skews)
    bound = statistics.median(r for r, _ in m.skews) / 2
    sign = "ahead of" if skew > 0 else "behind"
    value = f"{skew * 1000:+.2f} ms (±{bound * 1000:.2f} ms, median of {len(m.skews)})"
    cdata = {"skew_s": round(skew, 6), "uncertainty_s": round(bound, 6), "max_skew_s": s.opts.max_skew}
    if abs(skew) > s.opts.max_skew:
        return Check(link, agent, host, "clock", FAIL, value,
                     f"{host}'s clock is {fmt_secs(abs(skew))} {sign} {s.me}'s (limit "
                     f"{s.opts.max_skew:g}s): "
                     f"heartbeat ages and event times disagree across hosts",
                     "enable NTP on both hosts: `timedatectl set-ntp true` (then `timedatectl status` must "
                     "say 'System clock synchronized: yes')", cdata)
    return Check(link, agent, host, "clock", PASS, value, data=cdata)
