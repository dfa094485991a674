"""Schema versions per message type, on real sockets: an agent whose process speaks a type at another version
than the rest of the mesh is told so at registration (and says it), the twin's status shows it on both sides,
a frame at a version the receiver does not speak is answered bad_version, and equal versions report nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import zmq

from mesh.control import fetch_status
from mesh.messages import Register, VersionConflict
from network.codec import decode, new_id
from network.messages import REGISTRY, Echo, Error, ErrorCode, versions
from testing.harness import ROOT, mesh_dict, wait_for

# An echo agent in a process of its own whose mesh.echo is version 2: a replica built from a newer release.
BUMPED = """
import sys
import network.messages
network.messages.Echo.version = 2
from mesh.config import load_config
from mesh.runtime import resolve
resolve("echo")("bumped", load_config(sys.argv[1])).run()
"""


def detail_of(config, agent: str) -> str:
    return next(a.detail for a in fetch_status(config, timeout=1).agents if a.agent == agent)


def echo_at(config, agent: str, version: int) -> object:
    """A mesh.echo request at `version`, written by hand (the codec writes its own version); the decoded reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(config.endpoint(agent, "rpc"))
        sock.send(msgpack.packb([1, "mesh.echo", version, new_id(), b"", "test", time.time(),
                                 {"payload": b"hi", "seq": 1}], use_bin_type=True))
        assert sock.poll(5000), f"{agent} did not answer"
        return decode(sock.recv()).message
    finally:
        sock.close()
        ctx.term()


def test_versions_are_what_the_process_registers():
    spoken = versions()
    assert spoken == {name: cls.version for name, cls in REGISTRY.items()}
    assert spoken["mesh.echo"] == Echo.version == 1 and spoken["twin.register"] == Register.version


def test_a_replica_at_another_version_is_told_at_registration(write_config, run_agents, tmp_path):
    path, cfg = write_config(mesh_dict({"plain": {"kind": "echo", "depends_on": ["twin"]},
                                        "bumped": {"kind": "echo", "depends_on": ["twin"]}}))
    _, plain = run_agents(cfg, "twin", "plain")
    wait_for(lambda: plain.agent.state == "ready", what="plain ready")
    # same versions everywhere: nothing reported
    assert plain.agent.version_conflicts == [] and detail_of(cfg, "plain") == ""

    out = tmp_path / "bumped.out"
    env = dict(os.environ, MESH_LOG_STDERR="1", PYTHONPATH=str(ROOT))
    with out.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", BUMPED, str(path)], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        said = wait_for(lambda: "version conflict" in detail_of(cfg, "bumped") and detail_of(cfg, "bumped"),
                        timeout=60, what="the twin's status to show the bumped replica's conflict")
        assert said.startswith("version conflict: mesh.echo v2 (twin: v1, plain: v1)"), said
        assert "version conflict: mesh.echo v1 (bumped: v2)" in detail_of(cfg, "plain")   # both sides show it
        wait_for(lambda: "cannot talk to the rest of the mesh" in out.read_text(), timeout=10,
                 what="the bumped replica to say so")
        line = next(x for x in out.read_text().splitlines() if "cannot talk to the rest of the mesh" in x)
        assert "mesh.echo v2 (twin: v1, plain: v1)" in line and "bad_version" in line
        assert plain.agent.version_conflicts == []   # told at its own registration: nothing then

        # frames at a version the receiver does not speak: a clear error, each way
        for agent, sent, speaks in (("plain", 2, 1), ("bumped", 1, 2)):
            reply = echo_at(cfg, agent, sent)
            assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_VERSION, reply
            assert reply.detail == {"got": sent, "supported": speaks}
            assert f"version {sent} is not supported (this agent speaks version {speaks})" in reply.message
        assert echo_at(cfg, "plain", 1) == Echo(payload=b"hi", seq=1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # the bumped replica deregistered: nothing conflicts any more
    wait_for(lambda: detail_of(cfg, "plain") == "", what="plain's conflict gone with the bumped replica")


def test_a_conflict_names_each_peer_at_its_version():
    c = VersionConflict(message_type="extract.page", version=2, peers={"crawler": 1, "extractor-1": 1})
    assert c.describe() == "extract.page v2 (crawler: v1, extractor-1: v1)"
