"""CURVE: keys per host, encrypted endpoints, and refusal of clients without the right key."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import zmq
import zmq.auth

from agents.echo import EchoAgent
from agents.twin.agent import DigitalTwin
from mesh.config import ConfigError
from mesh.control import client, fetch_status
from mesh.runtime import StartupError
from network.messages import Echo, Ping
from network.rpc import RequestTimeout, RpcClient
from network.security import MissingKey, load_identity, secret_path
from testing.harness import ROOT, MeshUp, free_port_block, mesh_dict, wait_for


def meshctl(*args):
    return subprocess.run([sys.executable, "-m", "ops.meshctl", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, COLUMNS="200"))


@pytest.fixture
def keys(tmp_path):
    keys_dir = tmp_path / "keys"
    r = meshctl("keys", "generate", "local", "--keys-dir", str(keys_dir))
    assert r.returncode == 0, r.stderr
    outsider = tmp_path / "outsider-keys"
    assert meshctl("keys", "generate", "intruder", "--keys-dir", str(outsider)).returncode == 0
    return keys_dir, outsider


def test_keys_generate_and_list(keys):
    keys_dir, _ = keys
    listing = meshctl("keys", "list", "--keys-dir", str(keys_dir), "--json")
    (entry,) = json.loads(listing.stdout)
    assert entry["host"] == "local" and entry["secret_here"] and len(entry["public"]) == 40
    assert oct(secret_path(keys_dir, "local").stat().st_mode & 0o777) == "0o600"
    again = meshctl("keys", "generate", "local", "--keys-dir", str(keys_dir))
    assert "exists; pass --force" in again.stderr  # never overwritten by accident


def test_curve_mesh_admits_only_known_keys(write_config, run_agents, keys, caplog):
    keys_dir, outsider = keys
    data = mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]}})
    data["security"] = {"curve": "on", "keys_dir": str(keys_dir)}
    _, cfg = write_config(data)
    assert cfg.curve_enabled("local")
    twin, a = run_agents(cfg, "twin", "a")
    with client(cfg, "a", timeout=2, retries=3) as c:
        wait_for(lambda: c.request(Ping()).state == "ready", what="a ready over CURVE")
        assert c.request(Echo(payload=b"secret", seq=1)).payload == b"secret"

    server_key = load_identity(keys_dir, "local").public
    refused = lambda: sum(a.agent.metrics.sample("mesh_auth_refused_total", {"reason": r})  # noqa: E731
                          for r in ("auth", "protocol", "handshake"))
    before = refused()
    intruder = load_identity(outsider, "intruder")
    with caplog.at_level(logging.WARNING, logger="network.rpc"):
        with RpcClient(cfg.endpoint("a"), timeout=0.5, retries=0) as plain:
            with pytest.raises(RequestTimeout):
                plain.request(Ping())  # no CURVE at all
        # a key pair the mesh does not know, even with the right server key
        wrong = zmq.Context()
        sock = wrong.socket(zmq.REQ)
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey = intruder.public, intruder.secret
        sock.curve_serverkey = server_key
        sock.connect(cfg.endpoint("a"))
        sock.send(b"hello")
        assert sock.poll(500) == 0, "an unknown key got an answer"
        sock.close()
        wrong.term()
        wait_for(lambda: refused() >= before + 2, what="refusals counted")
    assert a.agent.metrics.sample("mesh_auth_refused_total", {"reason": "auth"}) >= 1
    assert any("refused a connection" in r.getMessage() for r in caplog.records)
    # the mesh still works for the right key
    with client(cfg, "a", timeout=2) as c:
        assert c.request(Echo(seq=2)).seq == 2


def test_wrong_server_key_gets_no_answer(write_config, run_agents, keys):
    keys_dir, outsider = keys
    data = mesh_dict({})
    data["security"] = {"curve": "on", "keys_dir": str(keys_dir)}
    _, cfg = write_config(data)
    run_agents(cfg, "twin")
    me = load_identity(keys_dir, "local")
    impostor_server = zmq.auth.load_certificate(str(outsider / "public" / "intruder.key"))[0]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = me.public, me.secret, impostor_server
    sock.connect(cfg.endpoint("twin"))
    sock.send(b"x")
    assert sock.poll(700) == 0
    sock.close()
    ctx.term()


def test_curve_on_without_keys_is_a_clear_error(write_config, tmp_path):
    data = mesh_dict({})
    data["security"] = {"curve": "on", "keys_dir": str(tmp_path / "nokeys")}
    _, cfg = write_config(data)
    with pytest.raises(MissingKey, match="meshctl keys generate local"):
        load_identity(cfg.security.keys_dir, "local")
    with pytest.raises(StartupError, match="missing"):
        DigitalTwin("twin", cfg).start()


def test_missing_peer_key_is_a_startup_error_not_a_crash(write_config, tmp_path):
    keys_dir = tmp_path / "only-far"
    assert meshctl("keys", "generate", "far", "--keys-dir", str(keys_dir)).returncode == 0
    data = mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]}},
                     hosts={"local": {"address": "127.0.0.1"}, "far": {"address": "127.0.0.2"}},
                     groups={"core": {"host": "local", "agents": ["twin"]}, "edge": {"host": "far", "agents": ["a"]}})
    data["security"] = {"curve": "on", "keys_dir": str(keys_dir)}
    _, cfg = write_config(data)
    agent = EchoAgent("a", cfg)
    with pytest.raises(StartupError, match="no public key for host 'local'"):
        agent.start()
    agent.close()


# --- CURVE by default: a host that binds beyond loopback never runs in plaintext by accident ------------------


def exposed_mesh(keys_dir, curve: str | None = None) -> dict:
    """A twin and an echo agent on host `local`, bound to 0.0.0.0 (reachable from the network); `curve` as given
    (None: left out, so `auto`)."""
    data = mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]}},
                     hosts={"local": {"address": "127.0.0.1", "bind": "0.0.0.0"}},
                     base_port=free_port_block(addresses=("0.0.0.0",)))
    data["agents"]["twin"]["settings"] = {"dashboard": False}
    data["security"] = {"keys_dir": str(keys_dir), **({"curve": curve} if curve else {})}
    return data


def ports_free(cfg) -> bool:
    for agent in cfg.agents:
        for port in cfg.ports(agent).values():
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    return False
    return True


def test_up_refuses_a_bind_beyond_loopback_without_keys_then_runs_with_generated_ones(write_config, tmp_path,
                                                                                       mesh_up):
    keys_dir = tmp_path / "keys"
    path, cfg = write_config(exposed_mesh(keys_dir))
    fix = f"run `meshctl keys generate local --keys-dir {keys_dir}` on local;"
    check = meshctl("check", "--config", str(path))
    said = " ".join(check.stderr.split())   # as one line, however the console wrapped it
    assert check.returncode == 2 and fix in said and "binds 0.0.0.0" in said, check.stderr
    up = MeshUp(path, out=tmp_path / "refused.out")
    assert up.wait(20) == 2 and up.leftovers == []
    out = " ".join(up.output().split())
    assert "security.curve: host local binds 0.0.0.0" in out and fix in out, out
    assert "started" not in out and "Ctrl-C stops" not in out, out   # refused before the banner, nothing spawned
    assert ports_free(cfg) and not (cfg.mesh.data_dir / "logs").exists()

    # the fix it names, as the owner runs it: then the same config starts, with CURVE on
    r = meshctl("keys", "generate", "local", "--keys-dir", str(keys_dir))
    assert r.returncode == 0, r.stderr
    assert meshctl("check", "--config", str(path)).returncode == 0
    running = mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="the mesh ready")
    assert "curve on" in (cfg.mesh.data_dir / "logs" / "a.log").read_text()
    assert "WARNING" not in running.output()


def test_curve_off_beyond_loopback_starts_with_one_loud_warning(write_config, tmp_path, mesh_up):
    path, cfg = write_config(exposed_mesh(tmp_path / "nokeys", curve="off"))
    assert not cfg.curve_enabled("local")
    line = ("CURVE is off (security.curve: off): host local's agents listen on 0.0.0.0 in plaintext, so anyone on "
            "the network can talk to the agents")
    check = meshctl("check", "--config", str(path))
    assert check.returncode == 0 and line in check.stderr, check.stderr
    running = mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="the mesh ready")
    warnings = [x for x in running.output().splitlines() if "WARNING" in x]
    assert len(warnings) == 1 and line in warnings[0], running.output()


def test_loopback_without_keys_starts_in_plaintext_without_a_warning(write_config, tmp_path, mesh_up):
    data = mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]}})
    data["security"] = {"curve": "auto", "keys_dir": str(tmp_path / "nokeys")}
    path, cfg = write_config(data)
    running = mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="the mesh ready")
    assert "curve off" in (cfg.mesh.data_dir / "logs" / "a.log").read_text()
    assert "WARNING" not in running.output()


def test_an_agent_refuses_to_bind_in_plaintext_where_curve_is_required(write_config, tmp_path):
    """Started on its own (as in a container), without `meshctl up`'s check: the same refusal, before it binds."""
    _, cfg = write_config(exposed_mesh(tmp_path / "keys"))
    with pytest.raises(ConfigError) as expected:
        cfg.check_curve("local")
    for agent in (EchoAgent("a", cfg), DigitalTwin("twin", cfg)):
        with pytest.raises(StartupError) as info:
            agent.start()
        agent.close()   # what the runtime does after a failed start: nothing set up yet, nothing to fail on
        assert str(info.value) == str(expected.value) and "meshctl keys generate local" in str(info.value)
    assert ports_free(cfg)
