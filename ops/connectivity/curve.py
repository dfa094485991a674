"""2. CURVE: a mesh.ping with this host's keys must be answered, and one with a throwaway key pair must not be.
A plaintext link fails, unless the config says `security.curve: off` in so many words: then it is a warning (and
still a failure under --require-curve)."""

from __future__ import annotations

import zmq

from network.security import MissingKey, generate_command, secret_path
from ops.connectivity.handshake import Attempt, watched_ping
from ops.connectivity.report import FAIL, PASS, WARN, Check, fmt_ms
from ops.connectivity.session import Session


def check_curve(s: Session, agent: str) -> list[Check]:
    """The keyed ping (must be answered) and, with CURVE on, a throwaway key (must not be)."""
    host, me = s.cfg.host_of(agent), s.me
    if not s.curve:
        return [_curve_off(s, agent)]
    if s.identity is None:
        return [Check(s.link(agent), agent, host, "curve", FAIL, "no key pair here", s.identity_error,
                      f"`meshctl keys generate {me}` on {me} (or copy its key pair from where it was "
                      f"made), copy "
                      f"keys/public/{me}.key to {host}, restart both meshes", {"curve": True})]
    try:
        keys = s.curve_keys(host)
    except MissingKey as exc:
        return [Check(s.link(agent), agent, host, "curve", FAIL, f"no keys/public/{host}.key here", str(exc),
                      f"copy keys/public/{host}.key from {host} to {s.cfg.security.keys_dir}/public/ "
                      f"on {me}; "
                      f"`meshctl keys list` on both hosts", {"curve": True})]
    keyed = _keyed(s, agent, keys)
    if keyed.status != PASS:
        return [keyed]
    return [keyed, _unknown_key(s, agent, server_key=keys[2])]


def _keys_fix(s: Session, host: str) -> str:
    me = s.me
    return (f"`meshctl keys list` on both hosts (the {me} and {host} rows must show the same keys on both); "
            f"copy "
            f"keys/public/{me}.key to {host}'s keys/public/ and keys/public/{host}.key to {me}'s keys/public/, "
            f"then restart both meshes ({s.up_cmd(me)} on {me}, {s.up_cmd(host)} on {host})")


def _curve_off(s: Session, agent: str) -> Check:
    """CURVE is off here: a plain ping answered fails, unless `curve: off` was chosen (then a warning, but a
    failure under --require-curve); refused, the other host requires CURVE."""
    host, link, me = s.cfg.host_of(agent), s.link(agent), s.me
    attempt = watched_ping(s, s.cfg.endpoint(agent, "rpc"), None, s.timeout)
    if attempt.outcome == "answered":
        chosen = s.cfg.security.curve == "off"
        status = WARN if chosen and not s.opts.require_curve else FAIL
        why = ("security.curve: off" if chosen else
               f"security.curve {s.cfg.security.curve}, no {secret_path(s.cfg.security.keys_dir, me)}, "
               f"loopback only")
        return Check(link, agent, host, "curve", status, "CURVE off (plain text, anyone admitted)",
                     f"CURVE is off on {me} ({why}): links are unencrypted and unauthenticated"
                     + ("" if chosen else "; plaintext between hosts needs `security.curve: off` in so many words"),
                     f"`{generate_command(s.cfg.security.keys_dir, me)}` on {me} and "
                     f"`{generate_command(s.cfg.security.keys_dir, host)}` on {host}, copy each host's "
                     f"keys/public/HOST.key to the other's keys/public/, set security.curve: on, restart both "
                     f"meshes ({s.up_cmd(me)} on {me}, {s.up_cmd(host)} on {host})",
                     {"curve": False, "answered": True, "curve_setting": s.cfg.security.curve})
    if attempt.outcome in ("refused_auth", "handshake_failed"):
        return Check(link, agent, host, "curve", FAIL, f"handshake refused ({attempt.detail})",
                     f"{host} requires CURVE but it is off on {me} (no "
                     f"{s.cfg.security.keys_dir}/private/"
                     f"{me}.key_secret here)",
                     f"put {me}'s key pair in {s.cfg.security.keys_dir} on {me} "
                     f"(keys/private/{me}.key_secret "
                     f"and keys/public/*.key, as made by `meshctl keys generate mainpc pc2`; or set "
                     f"MESH_KEYS_DIR to where they are); `meshctl keys list` on both hosts must show the "
                     f"same public keys", {"curve": False, "outcome": attempt.outcome})
    return _silent(s, agent, attempt, curve=False)


def _keyed(s: Session, agent: str, keys: tuple[bytes, bytes, bytes]) -> Check:
    """The ping with this host's key pair: answered, refused (which key is wrong), or silent."""
    host, link, me = s.cfg.host_of(agent), s.link(agent), s.me
    endpoint = s.cfg.endpoint(agent, "rpc")
    attempt = watched_ping(s, endpoint, keys, s.timeout)
    if attempt.outcome == "answered":
        return Check(link, agent, host, "curve", PASS, f"keyed ping answered ({fmt_ms(attempt.ms)})",
                     data={"curve": True, "answered": True, "ms": round(attempt.ms * 1000, 3)})
    if attempt.outcome == "refused_auth":
        return Check(link, agent, host, "curve", FAIL, f"{host} refused {me}'s key ({attempt.detail})",
                     f"key mismatch: {host} refuses {me}'s public key: {host}'s keys/public/{me}.key is "
                     f"missing "
                     f"or not {me}'s current key (or {host}'s mesh started before it was copied)",
                     _keys_fix(s, host), {"curve": True, "outcome": attempt.outcome})
    if attempt.outcome == "handshake_failed":
        plain = watched_ping(s, endpoint, None, min(s.timeout, 1.0))
        if plain.outcome == "answered":
            cause = (f"{host} runs without CURVE (no keys/private/{host}.key_secret there, or security.curve off) "
                     f"while {me} has it on")
            fix = (f"on {host}: put its key pair in keys/ (keys/private/{host}.key_secret and keys/public/*.key, "
                   f"as made by `meshctl keys generate mainpc pc2`), then {s.up_cmd(host)}")
        else:
            server_key = keys[2].decode()
            cause = (f"key mismatch: the CURVE handshake with {s.rpc_where(agent)} fails ({attempt.detail}): "
                     f"keys/public/{host}.key on {me} ({server_key[:10]}...) is not the key {host} runs with "
                     f"(regenerated with --force? a different keys dir on {host}?)")
            fix = _keys_fix(s, host)
        return Check(link, agent, host, "curve", FAIL, f"handshake failed ({attempt.detail})", cause, fix,
                     {"curve": True, "outcome": attempt.outcome})
    return _silent(s, agent, attempt, curve=True)


def _unknown_key(s: Session, agent: str, *, server_key: bytes) -> Check:
    """A throwaway key pair must be refused."""
    host, link = s.cfg.host_of(agent), s.link(agent)
    public, secret = zmq.curve_keypair()
    rogue = watched_ping(s, s.cfg.endpoint(agent, "rpc"), (public, secret, server_key), s.timeout)
    if rogue.outcome == "answered":
        return Check(link, agent, host, "curve: unknown key", FAIL, "a throwaway key was answered",
                     f"{host} admits clients with unknown keys: its CURVE authenticator does not restrict keys "
                     f"(its keys dir holds unexpected public keys, or the agent runs without ZAP)",
                     f"on {host}: `meshctl keys list` must show only the mesh's hosts; remove other keys from "
                     f"keys/public/, restart: {s.up_cmd(host)}", {"outcome": rogue.outcome})
    how = {"refused_auth": f"refused ({rogue.detail}) in {fmt_ms(rogue.ms)}",
           "handshake_failed": f"refused ({rogue.detail}) in {fmt_ms(rogue.ms)}"}.get(
        rogue.outcome, f"no answer within {s.timeout:g}s")
    return Check(link, agent, host, "curve: unknown key", PASS, how,
                 data={"outcome": rogue.outcome, "ms": round(rogue.ms * 1000, 3)})


def _silent(s: Session, agent: str, attempt: Attempt, *, curve: bool) -> Check:
    """The ping got no answer at all: hung agent, or something else listening."""
    host = s.cfg.host_of(agent)
    where = s.rpc_where(agent)
    if attempt.outcome == "no_reply":
        cause = (f"{where} completes the handshake but {agent} does not answer mesh.ping within {s.timeout:g}s: "
                 f"the agent is hung or overloaded")
        fix = f"on {host}: `meshctl status`, `meshctl logs {agent}`; restart it: {s.up_cmd(host)}"
    else:
        cause = (f"TCP connects to {where} but no {'CURVE' if curve else 'ZMTP'} handshake within "
                 f"{s.timeout:g}s: "
                 f"the agent is hung, or something else listens there (wrong address?)"
                 + (" or the keys do not match" if curve else ""))
        fix = (f"check {s.addr_var(host)} (now {s.addr(host)}); on {host}: `meshctl status`, "
               f"`meshctl logs {agent}`" + (", `meshctl keys list` on both hosts" if curve else ""))
    return Check(s.link(agent), agent, host, "curve", FAIL, f"no answer within {s.timeout:g}s", cause, fix,
                 {"curve": curve, "outcome": attempt.outcome})
