"""10,000 random and malformed frames at a running agent process: it keeps running and answering."""

from __future__ import annotations

import os
import re
import urllib.request

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.control import client, fetch_status
from network.codec import encode
from network.messages import REGISTRY, Echo, Ping
from tests.conftest import mesh_dict, wait_for
from tests.samples import SAMPLES

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)


@st.composite
def envelopes(draw):
    """Frames that look like the real thing, with one or more fields wrong."""
    type_name = draw(st.sampled_from(sorted(REGISTRY)) | st.text(max_size=12))
    fields = [
        draw(st.sampled_from([1, 1, 1, 0, 2, "1"])),
        type_name,
        draw(st.sampled_from([1, 1, 2, -1, "1"])),
        draw(st.binary(min_size=16, max_size=16) | st.binary(max_size=20)),
        draw(st.just(b"") | st.binary(min_size=16, max_size=16) | st.binary(max_size=20)),
        draw(st.text(max_size=10) | st.integers(-(2**31), 2**31)),
        draw(st.floats() | st.integers(-(2**31), 2**31)),
        draw(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5) | msgpack_values),
    ]
    cut = draw(st.integers(0, 9))
    return msgpack.packb(fields[:cut] if cut < 8 else fields, use_bin_type=True)


@st.composite
def mangled_valid(draw):
    """A valid frame of a real type, then truncated, extended or bit-flipped."""
    _, frame = encode(draw(st.sampled_from(list(SAMPLES.values()))), sender="fuzz")
    how = draw(st.sampled_from(["truncate", "append", "flip", "replay"]))
    if how == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if how == "append":
        return frame + draw(st.binary(min_size=1, max_size=10))
    if how == "flip":
        i = draw(st.integers(0, len(frame) - 1))
        return frame[:i] + bytes([frame[i] ^ draw(st.integers(1, 255))]) + frame[i + 1:]
    return frame


frames = st.lists(
    st.binary(max_size=64) | envelopes() | mangled_valid() | msgpack_values.map(lambda v: msgpack.packb(v)),
    min_size=1, max_size=3,
)


def scrape_errors(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r'^mesh_errors_total\{[^}]*\} (\S+)$', body, re.M))


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
