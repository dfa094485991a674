"""The run: which checks each remote agent gets, in which order, and which are skipped (or, for the
twin, failed with the cause) because an earlier check of the same link failed. TCP and CURVE are
checked for all agents at once, so a dead link costs about one --timeout, not one per check."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ops.connectivity.curve import check_curve
from ops.connectivity.local import check_local_probe
from ops.connectivity.pubsub import check_pubsub_in, check_pubsub_out
from ops.connectivity.report import FAIL, PASS, SKIP, WARN, Check
from ops.connectivity.roundtrip import check_rpc
from ops.connectivity.session import Session
from ops.connectivity.tcp import check_tcp, mark_hosts_down
from ops.connectivity.twin import check_twin

PORTS = ("rpc", "pub", "metrics")


def guarded(s: Session, agent: str | None, check: str, fn: Callable[..., Check | list[Check]], *args) -> list[Check]:
    """Runs one check; an unexpected error becomes a failed row instead of ending the whole run."""
    try:
        out = fn(*args)
    except Exception as exc:  # a bug or an odd answer must not hide every other result
        host = s.cfg.host_of(agent) if agent else s.me
        return [Check(s.link(agent) if agent else s.me, agent, host, check, FAIL, f"error: {type(exc).__name__}",
                      f"the check itself failed: {type(exc).__name__}: {exc}",
                      "run it again; if it repeats, report it with the output of --json")]
    return out if isinstance(out, list) else [out]


def run_checks(s: Session) -> list[Check]:
    """Every check of the run, in the order of the table."""
    cfg, results = s.cfg, []

    def add(agent: str, host: str, check: str, status: str, value: str = "", cause: str = "", fix: str = "",
            link: str | None = None) -> None:
        results.append(Check(link=link or s.link(agent), agent=agent, host=host, check=check, status=status,
                             value=value, cause=cause, fix=fix))

    # TCP: every port of every remote agent at once, so dead links cost one timeout, not one per port
    targets = [(a, w) for a in s.remote for w in PORTS]
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(targets)))) as pool:
        tcp = dict(zip(targets, pool.map(lambda t: check_tcp(s, *t), targets), strict=True))
    mark_hosts_down(s, tcp)
    reachable = [a for a in s.remote if tcp[(a, "rpc")].status == PASS]
    # CURVE: one handshake per reachable agent, in parallel too
    with ThreadPoolExecutor(max_workers=max(1, len(reachable))) as pool:
        curve = dict(zip(reachable, pool.map(lambda a: guarded(s, a, "curve", check_curve, s, a), reachable),
                         strict=True))

    local_probe = guarded(s, s.local_probe, "rpc", check_local_probe, s)[0] if s.local_probe else None
    twin, twin_host = cfg.twin, cfg.host_of(cfg.twin)
    for agent in s.remote:
        host = cfg.host_of(agent)
        for which in PORTS:
            results.append(tcp[(agent, which)])
        probe = s.is_probe(agent)
        planned = ["curve", "rpc", "clock"]
        if probe:
            planned += [f"pub/sub {host}->{s.me}", f"pub/sub {s.me}->{host}"]
        if agent == twin:
            planned.append("twin")
        if agent not in curve:  # the rpc port is unreachable: nothing more to try on this link
            for name in planned:
                if name == "twin" and tcp[(agent, "rpc")].data.get("reason") == "refused":
                    where = f"{s.addr(host)}:{cfg.port(agent, 'rpc')}"
                    add(agent, host, "twin", FAIL, "no twin.status reply (refused)",
                        f"twin not running on {host}: nothing listens on {where}",
                        f"on {host}: {s.up_cmd(host)}")
                else:
                    add(agent, host, name, SKIP, f"not run: {agent}'s rpc port is unreachable")
            continue
        results.extend(curve[agent])
        if not curve[agent][0].data.get("answered"):  # CURVE off under --require-curve still answers
            for name in planned[1:]:
                if name == "twin" and curve[agent][0].data.get("outcome") in ("no_handshake", "no_reply"):
                    add(agent, host, "twin", FAIL, f"no answer within {s.timeout:g}s",
                        f"twin not running properly on {host}: it accepts connections on "
                        f"{s.addr(host)}:{cfg.port(agent, 'rpc')} but answers nothing (hung)",
                        f"on {host}: `meshctl logs {agent}`; restart the mesh there: {s.up_cmd(host)}")
                else:
                    add(agent, host, name, SKIP, "not run: no mesh.ping answered (see curve)")
            continue
        results.extend(guarded(s, agent, "rpc", check_rpc, s, agent))
        if probe:
            if tcp[(agent, "pub")].status == PASS:
                results.extend(guarded(s, agent, planned[3], check_pubsub_in, s, agent))
            else:
                add(agent, host, planned[3], SKIP, f"not run: {agent}'s pub port is unreachable")
            if local_probe is None:
                add(agent, host, planned[4], SKIP, f"not run: no probe agent on {s.me}")
            elif local_probe.status != PASS:
                add(agent, host, planned[4], SKIP, f"not run: {s.local_probe} does not answer")
            else:
                results.extend(guarded(s, agent, planned[4], check_pubsub_out, s, agent))
        if agent == twin:
            results.extend(guarded(s, twin, "twin", check_twin, s))
    if local_probe is not None:
        results.append(local_probe)
    if twin_host == s.me:
        results.extend(guarded(s, twin, "twin", check_twin, s))
    # hosts without a probe: pub/sub to and from them is not checked
    for host in [s.me, *sorted({cfg.host_of(a) for a in s.remote})]:
        if not s.probes_on(host):
            add("", host, "probe", WARN, f"no probe agent on {host}",
                f"{host} has no agent of kind probe, so pub/sub to and from {host} is not checked",
                f"declare one in config/mesh.yaml: `probe-{host}: {{kind: probe, depends_on: [twin], "
                f"required: "
                f"false}}` and list it in a group of host {host}", link=f"{s.me} -> {host}")
    return results
