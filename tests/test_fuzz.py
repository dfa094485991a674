"""10,000 random and malformed frames at a running agent process: it keeps running and answering."""

from __future__ import annotations

import os
import re
import urllib.request

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.control import client, fetch_status
from network.codec import encode
from network.messages import Echo, Ping
from testing.harness import mesh_dict, wait_for
from tests.fuzz.strategies import envelopes, mangled_valid, msgpack_values

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))

frames = st.lists(
    st.binary(max_size=64) | envelopes() | mangled_valid() | msgpack_values.map(lambda v: msgpack.packb(v)),
    min_size=1, max_size=3,
)


def scrape_errors(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r'^mesh_errors_total\{[^}]*\} (\S+)$', body, re.M))


@pytest.mark.slow   # 10 000 frames: about 45 s on 2 cores
def test_random_and_malformed_frames_leave_the_agent_running(write_config, mesh_up):
    path, cfg = write_config(mesh_dict({"target": {"kind": "echo", "depends_on": ["twin"]}},
                                       max_frame_bytes=64 * 1024))
    mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=20, what="mesh ready")
    pid = next(a.pid for a in fetch_status(cfg).agents if a.agent == "target")
    ctx = zmq.Context()
    attacker = ctx.socket(zmq.DEALER)
    attacker.linger = 0
    attacker.connect(cfg.endpoint("target"))
    probe = client(cfg, "target", timeout=2, retries=1)
    sent = {"n": 0, "replies": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(frames)
    def attack(parts):
        attacker.send_multipart(parts)
        sent["n"] += 1
        while attacker.poll(0):
            attacker.recv_multipart()
            sent["replies"] += 1
        if sent["n"] % 50 == 0:  # still alive and answering correctly
            assert probe.request(Echo(seq=sent["n"])).seq == sent["n"]

    try:
        attack()
        # oversized frames: typed error below the hard limit, dropped connection above it
        attacker.send_multipart([b"", encode(Echo(payload=b"x" * 100_000), sender="fuzz")[1]])
        attacker.send_multipart([b"", b"\x00" * (2 << 20)])
        assert probe.request(Ping()).state == "ready"
    finally:
        probe.close()
        attacker.close()
        ctx.term()
    assert sent["n"] >= EXAMPLES
    assert next(a.pid for a in fetch_status(cfg).agents if a.agent == "target") == pid, "the agent restarted"
    errors = scrape_errors(cfg.port("target", "metrics"))
    print(f"sent {sent['n']} frames, {sent['replies']} answers drained, {errors:.0f} errors counted")
    assert errors >= sent["n"] * 0.5  # the vast majority are rejected, and each rejection is counted
    log = (cfg.mesh.data_dir / "logs" / "target.log").read_text()
    assert "Traceback" not in log, "a frame made the agent log a traceback"
