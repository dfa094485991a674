"""This host's own agents (the local probe, the twin when it runs here): when one does not answer,
say why, from the cheapest precise test up: nothing listening, wrong address, no key here, the
running mesh and this check disagreeing about CURVE or its keys, or a hung agent."""

from __future__ import annotations

from typing import NamedTuple

from network.security import MissingKey
from ops.connectivity.handshake import Attempt, watched_ping
from ops.connectivity.report import FAIL, PASS, Check, fmt_ms
from ops.connectivity.session import Session
from ops.connectivity.tcp import check_tcp


class Diagnosis(NamedTuple):
    """A ping of a local agent: the attempt (None when it never got that far) and, when it was not
    answered, the row's value, the cause and the fix."""

    attempt: Attempt | None
    value: str
    cause: str
    fix: str

    @property
    def answered(self) -> bool:
        return self.attempt is not None and self.attempt.outcome == "answered"


def check_local_probe(s: Session) -> Check:
    """The local probe must answer (it publishes for pub/sub out)."""
    local = s.local_probe
    d = diagnose_local(s, local)
    if d.answered:
        state = getattr(d.attempt.message, "state", "?")
        return Check(s.link(local), local, s.me, "rpc", PASS, f"pong in {fmt_ms(d.attempt.ms)}, {state}",
                     data={"ms": round(d.attempt.ms * 1000, 3), "state": state})
    return Check(s.link(local), local, s.me, "rpc", FAIL, d.value, d.cause, d.fix)


def diagnose_local(s: Session, agent: str) -> Diagnosis:
    """Pings an agent of this host; when it does not answer, says why."""
    endpoint = s.cfg.endpoint(agent, "rpc")
    where = endpoint.removeprefix("tcp://")
    me = s.me
    tcp = check_tcp(s, agent, "rpc")
    if tcp.data.get("reason") == "refused":
        return Diagnosis(None, tcp.value,
                         f"the mesh is not running on this host: nothing listens on {where} ({agent})",
                         f"start it here: {s.up_cmd(me)}")
    if tcp.status != PASS:
        return Diagnosis(None, tcp.value,
                         f"{agent} of this host is not reachable at {where} ({tcp.value}): {s.addr_var(me)} "
                         f"(now {s.addr(me)}) is not this host's address?",
                         f"set {s.addr_var(me)} to this host's address (`ip -br addr`), then {s.up_cmd(me)}")
    try:
        keys = s.curve_keys(me) if s.curve else None
    except MissingKey as exc:
        return Diagnosis(None, "no CURVE key", str(exc), s.key_fix())
    if s.curve and keys is None:
        return Diagnosis(None, "no CURVE key", s.identity_error, s.key_fix())
    attempt = watched_ping(s, endpoint, keys, s.timeout)
    if attempt.outcome == "answered":
        return Diagnosis(attempt, "", "", "")
    if attempt.outcome in ("refused_auth", "handshake_failed"):
        value = f"handshake failed ({attempt.detail})"
        if s.curve and watched_ping(s, endpoint, None, min(s.timeout, 1.0)).outcome == "answered":
            return Diagnosis(attempt, value,
                             f"the mesh on this host runs without CURVE although {s.cfg.security.keys_dir} "
                             f"holds {me}'s key pair (it started before the keys were made, or with another keys dir "
                             f"/ MESH_KEYS_DIR)",
                             f"restart the mesh here with these keys (Ctrl-C, then {s.up_cmd(me)} with the same "
                             f"MESH_KEYS_DIR); its agents must log `curve on`")
        if not s.curve:
            return Diagnosis(attempt, value,
                             f"the mesh here runs with CURVE but this check has no key: CURVE is off for "
                             f"{me} in {s.config_arg} ({attempt.detail})",
                             f"run this check with the same config and MESH_KEYS_DIR as the mesh ({s.up_cmd(me)})")
        return Diagnosis(attempt, value,
                         f"key mismatch on this host: the running mesh uses another key pair than "
                         f"{s.cfg.security.keys_dir} holds now (keys regenerated or replaced after it started?) "
                         f"({attempt.detail})",
                         f"restart the mesh here so that it reads the current keys (Ctrl-C, then {s.up_cmd(me)}); "
                         f"then `meshctl keys list` on both hosts and copy keys/public/{me}.key to the other host")
    return Diagnosis(attempt, f"no answer within {s.timeout:g}s",
                     f"{agent} accepts connections on {where} but does not answer within {s.timeout:g}s: it is "
                     f"hung (or something else listens there)",
                     f"`meshctl status`, `meshctl logs {agent}`; restart the mesh here: {s.up_cmd(me)}")
