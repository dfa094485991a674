"""6. The twin: it answers twin.status, and it sees every agent across the link ready (for each
one that is not, what its state means and what to do)."""

from __future__ import annotations

import time

from mesh.control import fetch_status
from mesh.messages import AgentStatus, StatusReply
from network.rpc import MeshError
from network.security import MissingKey
from ops.connectivity.local import diagnose_local
from ops.connectivity.report import FAIL, PASS, WARN, Check, fmt_ms
from ops.connectivity.session import Session


def check_twin(s: Session) -> list[Check]:
    """The twin row, and (when it answered) the twin view row."""
    twin = s.cfg.twin
    host = s.cfg.host_of(twin)
    where = s.rpc_where(twin)
    if host == s.me:  # cheap and precise first: is the twin of this host listening and answering at all?
        d = diagnose_local(s, twin)
        if not d.answered:
            cause = ("twin not running: " + d.cause) if "not running on this host" in d.cause else d.cause
            return [Check(s.link(twin), twin, host, "twin", FAIL, d.value, cause, d.fix)]
    started = time.perf_counter()
    try:
        status = fetch_status(s.cfg, timeout=s.timeout)
    except MissingKey as exc:
        return [Check(s.link(twin), twin, host, "twin", FAIL, "no CURVE key", str(exc), s.key_fix())]
    except MeshError as exc:
        if host == s.me:
            return [Check(s.link(twin), twin, host, "twin", FAIL, f"no twin.status reply ({exc.code})",
                          f"{twin} answers mesh.ping but not twin.status: {exc.message}",
                          f"`meshctl logs {twin}`; restart the mesh here: {s.up_cmd(host)}")]
        # only called once the twin answered mesh.ping: it runs, so the link or the twin itself is slow
        return [Check(s.link(twin), twin, host, "twin", FAIL, f"no twin.status reply ({exc.code})",
                      f"{twin} answers mesh.ping but not twin.status within {s.timeout:g}s at {where}: "
                      f"the link is lossy or the twin stalls ({exc.message})",
                      f"`ping -c 50 {s.addr(host)}` for loss; on {host}: `meshctl logs {twin}`; if it "
                      f"hangs, restart the mesh there: {s.up_cmd(host)}")]
    took = time.perf_counter() - started
    ready = sum(a.state == "ready" for a in status.agents)
    out = [Check(s.link(twin), twin, host, "twin", PASS,
                 f"mesh {status.mesh}: {status.mesh_state}, {ready}/{len(status.agents)} ready ({fmt_ms(took)})",
                 data={"ms": round(took * 1000, 3), "mesh_state": status.mesh_state})]
    view = twin_view(s, status)
    return out + ([view] if view else [])


def twin_view(s: Session, status: StatusReply) -> Check | None:
    """Every agent across the link (not on the twin's host) as the twin sees it; None when there is none."""
    twin = s.cfg.twin
    host = s.cfg.host_of(twin)
    across = {a.agent: a for a in status.agents if a.host != host}
    if not across:
        return None
    others = sorted({a.host for a in across.values()})
    link = f"{', '.join(others)} agents -> {twin}@{host}"
    bad = {n: a for n, a in across.items() if a.state != "ready"}
    states = {n: a.state for n, a in across.items()}
    if not bad:
        return Check(link, twin, host, "twin view", PASS, f"{len(across)}/{len(across)} ready: "
                     + ", ".join(across), data={"states": states})
    causes, fixes = [], []
    for name, a in bad.items():
        cause, fix = _not_ready(s, name, a)
        causes.append(cause)
        fixes.append(fix)
    only_degraded = all(a.state == "degraded" for a in bad.values())
    value = ", ".join(f"{n} {a.state}" for n, a in bad.items())
    return Check(link, twin, host, "twin view", WARN if only_degraded else FAIL,
                 f"{len(across) - len(bad)}/{len(across)} ready; {value}", "; ".join(causes),
                 "; ".join(dict.fromkeys(fixes)), {"states": states})


def _not_ready(s: Session, name: str, a: AgentStatus) -> tuple[str, str]:
    """(cause, fix) for an agent across the link that the twin does not see ready."""
    twin = s.cfg.twin
    host = s.cfg.host_of(twin)
    h = a.host
    if a.state == "declared":
        return (f"{name} never registered with the twin: {h}'s mesh is not running, or {h} cannot reach "
                f"the twin at {s.rpc_where(twin)}",
                f"on {h}: {s.up_cmd(h)}; check {s.addr_var(host)} there (now {s.addr(host)} "
                f"here) "
                f"and `nc -vz {s.addr(host)} {s.cfg.port(twin, 'rpc')}`")
    if a.state == "stopped":
        return (f"{name} stopped (deregistered): {h}'s mesh was stopped (or, started again, its agents "
                f"cannot register: see the rows above)",
                f"on {h}: {s.up_cmd(h)}")
    if a.state == "unreachable":
        age = f" for {a.last_heartbeat_age_s:.1f}s" if a.last_heartbeat_age_s is not None else ""
        return (f"{name} is unreachable: no agent of {h} has heartbeated{age}: the link between {h} and "
                f"{host} is down, or {h} itself is down or hung",
                f"`ping {s.addr(h)}` from {host} and `ping {s.addr(host)}` from {h}; on {h}: "
                f"`meshctl status`, `meshctl logs {name}`")
    if a.state == "dead":
        age = f" for {a.last_heartbeat_age_s:.1f}s" if a.last_heartbeat_age_s is not None else ""
        return (f"{name} is dead: no heartbeat{age} while other agents of {h} are fine: it crashed or "
                f"hangs",
                f"on {h}: `meshctl logs {name}` (the supervisor restarts it; if not, {s.up_cmd(h)})")
    why = ", ".join(a.waiting_on) if a.waiting_on else a.detail
    return (f"{name} is {a.state}" + (f" ({why})" if why else ""),
            f"on {h}: `meshctl status`, `meshctl logs {name}`")
