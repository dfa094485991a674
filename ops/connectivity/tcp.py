"""1. Plain TCP connects: "refused" (nothing listens) against "no answer" (address, link, firewall)."""

from __future__ import annotations

import socket
import time

from ops.connectivity.report import FAIL, PASS, Check, fmt_ms
from ops.connectivity.session import Session


def check_tcp(s: Session, agent: str, which: str) -> Check:
    host = s.cfg.host_of(agent)
    address, port = s.addr(host), s.cfg.port(agent, which)
    where = f"{address}:{port}"
    started = time.perf_counter()
    try:
        with socket.create_connection((address, port), timeout=s.timeout):
            pass
    except ConnectionRefusedError:
        return Check(s.link(agent), agent, host, f"tcp {which}", FAIL, f"refused {where}",
                     f"nothing listens on {where} ({agent} {which}): the mesh is not running on {host}, "
                     f"or {agent} is down",
                     f"start the mesh on {host}: {s.up_cmd(host)} (if it runs: `meshctl status` and "
                     f"`meshctl logs {agent}` there)", {"reason": "refused", "address": address, "port": port})
    except (TimeoutError, socket.timeout):
        return Check(s.link(agent), agent, host, f"tcp {which}", FAIL, f"no answer from {where}",
                     f"no answer from {where} within {s.timeout:g}s: wrong address or link down "
                     f"(or a firewall dropping packets)",
                     f"check {s.addr_var(host)} (now {address}) and `ping {address}`; on {host}: "
                     f"`ss -ltn | grep {port}`, and open ports in the firewall",
                     {"reason": "timeout", "address": address, "port": port})
    except socket.gaierror as exc:
        return Check(s.link(agent), agent, host, f"tcp {which}", FAIL, f"cannot resolve {address}",
                     f"{address} does not resolve ({exc.strerror})",
                     f"set {s.addr_var(host)} (now {address}) to {host}'s IP address",
                     {"reason": "resolve", "address": address, "port": port})
    except OSError as exc:
        return Check(s.link(agent), agent, host, f"tcp {which}", FAIL, f"{exc.strerror or exc} ({where})",
                     f"cannot reach {where}: {exc.strerror or exc}: wrong address or link down",
                     f"check {s.addr_var(host)} (now {address}) and `ping {address}`; check the route "
                     f"(`ip route get {address}`)", {"reason": "unreachable", "address": address, "port": port})
    took = time.perf_counter() - started
    return Check(s.link(agent), agent, host, f"tcp {which}", PASS, f"{where} open ({fmt_ms(took)})",
                 data={"address": address, "port": port, "connect_ms": round(took * 1000, 3)})


def mark_hosts_down(s: Session, tcp: dict[tuple[str, str], Check]) -> None:
    """A host whose every rpc port refuses: the mesh is not running there; its refused rows say so."""
    for host in {s.cfg.host_of(a) for a in s.remote}:
        rpcs = [tcp[(a, "rpc")] for a in s.remote if s.cfg.host_of(a) == host]
        if rpcs and all(c.data.get("reason") == "refused" for c in rpcs):
            for c in tcp.values():
                if c.host == host and c.data.get("reason") == "refused":
                    c.cause = (f"nothing listens on {c.data['address']}:{c.data['port']}: the mesh is not running "
                               f"on {host} (no agent of {host} accepts connections)")
                    c.fix = f"start the mesh on {host}: {s.up_cmd(host)}"
