"""CURVE: keys per host, encrypted endpoints, and refusal of clients without the right key."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import zmq
import zmq.auth

from mesh.control import client
from network.messages import Echo, Ping
from network.rpc import RequestTimeout, RpcClient
from network.security import MissingKey, load_identity, secret_path
from testing.harness import ROOT, mesh_dict, wait_for


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
    (entry,) = __import__("json").loads(listing.stdout)
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
    from agents.twin.agent import DigitalTwin
    from mesh.runtime import StartupError

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
    from agents.echo import EchoAgent
    from mesh.runtime import StartupError

    agent = EchoAgent("a", cfg)
    with pytest.raises(StartupError, match="no public key for host 'local'"):
        agent.start()
    agent.close()
