"""The frame codec: every message type round-trips, every bad frame gets its own error, also as the
`mesh.error` a server sends for it on a real socket."""

from __future__ import annotations

import threading

import msgpack
import pytest
import zmq

from mesh.messages import Register
from network import codec
from network.codec import FrameTooLarge, InvalidBody, Undecodable, UnknownType, VersionMismatch, decode, encode
from network.messages import Echo, Error, Ping
from network.metrics import MeshMetrics
from network.reactor import Reactor
from network.rpc import RpcClient, RpcServer
from tests.samples import SAMPLES, shipped


def test_every_registered_type_has_a_sample():
    assert set(SAMPLES) == shipped(), "add a sample for each new message type in tests/samples.py"


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_round_trip(type_name):
    msg = SAMPLES[type_name]
    mid, frame = encode(msg, sender="tester", cid=b"c" * 16)
    env = decode(frame)
    assert env.message == msg
    assert env.id == mid and len(mid) == 16
    assert env.cid == b"c" * 16 and env.sender == "tester"
    assert env.message.type_name == type_name


def test_frame_layout_is_the_documented_array():
    mid, frame = encode(Echo(payload=b"hi", seq=7), sender="a", cid=b"")
    fmt, type_name, version, id_, cid, sender, ts, body = msgpack.unpackb(frame)
    assert (fmt, type_name, version, id_, cid, sender) == (1, "mesh.echo", 1, mid, b"", "a")
    assert isinstance(ts, float) and body == {"payload": b"hi", "seq": 7}


def _frame(*fields):
    return msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize("frame, error", [
    (b"", Undecodable),
    (b"\xc1", Undecodable),                       # never-used msgpack byte
    (b"\x93\x01\x02", Undecodable),               # truncated array
    (msgpack.packb({"a": 1}), Undecodable),       # not an array
    (_frame(2, "mesh.ping", 1, b"i" * 16, b"", "x", 1.0, {}), Undecodable),   # unknown frame format
    (_frame(1, "mesh.ping", 1, "not-bin", b"", "x", 1.0, {}), Undecodable),  # id of the wrong type
    (_frame(1, 5, 1, b"i" * 16, b"", "x", 1.0, {}), Undecodable),            # type name not a string
    (_frame(1, "mesh.ping", 1, b"", b"", "x", 1.0, {}), Undecodable),        # id must be 16 bytes
    (_frame(1, "mesh.ping", 1, b"i" * 16, b"c" * 3, "x", 1.0, {}), Undecodable),  # cid 16 bytes or empty
    (_frame(1, "mesh.ping", True, b"i" * 16, b"", "x", 1.0, {}), Undecodable),  # version must be an int
    (_frame(1, "no.such", 1, b"i" * 16, b"", "x", 1.0, {}), UnknownType),
    (_frame(1, "mesh.ping", 9, b"i" * 16, b"", "x", 1.0, {}), VersionMismatch),
    (_frame(1, "mesh.echo", 1, b"i" * 16, b"", "x", 1.0, []), InvalidBody),
    (_frame(1, "mesh.echo", 1, b"i" * 16, b"", "x", 1.0, {"seq": "many"}), InvalidBody),
    (_frame(1, "mesh.ping", 1, b"i" * 16, b"", "x", 1.0, {"extra": 1}), InvalidBody),
    (msgpack.packb([[[[[[[[]]]]]]]] * 3), Undecodable),
    (_frame(True, "mesh.ping", 1, b"i" * 16, b"", "x", 1.0, {}), Undecodable),   # format: true is not the int 1
    (_frame(1, "mesh.ping", 1, b"i" * 16, b"", "x", True, {}), Undecodable),     # ts: a boolean is not a number
    (_frame(1, "mesh.ping", 1, b"i" * 16, b"", "x", 1.0, {1: 2}), Undecodable),  # a key neither str nor bin
    (_frame(1, "mesh.echo", 1, b"i" * 16, b"", "x", 1.0, {b"seq": 1}), InvalidBody),  # a bin key in the body
])
def test_bad_frames_raise_their_own_error(frame, error):
    with pytest.raises(error) as info:
        decode(frame)
    assert str(info.value)


def test_errors_keep_the_request_id_when_it_could_be_read():
    with pytest.raises(UnknownType) as info:
        decode(_frame(1, "no.such", 1, b"i" * 16, b"", "peer", 1.0, {}))
    assert info.value.msg_id == b"i" * 16 and info.value.sender == "peer"


def test_size_limit_is_checked_before_decoding():
    _, frame = encode(Echo(payload=b"x" * 5000), sender="a")
    with pytest.raises(FrameTooLarge) as info:
        decode(frame, max_frame_bytes=4096)
    assert info.value.detail["limit"] == 4096
    assert decode(frame, max_frame_bytes=len(frame)).message.payload == b"x" * 5000


def test_deep_nesting_is_rejected_not_crashing():
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(Undecodable):
        decode(deep, max_frame_bytes=1 << 20)


def test_type_names_are_unique():
    with pytest.raises(TypeError, match="already registered"):
        class Impostor(Ping):  # noqa: F841
            type_name = "mesh.echo"


def test_register_defaults():
    msg = Register(agent="a", kind="echo", host="h", instance="i", pid=1)
    assert decode(encode(msg, sender="a")[1]).message.state == "starting"
    assert codec.FRAME_FORMAT == 1


def _heartbeat(gauges: dict) -> bytes:
    body = {"agent": "a", "instance": "i", "state": "ready", "stats": {"gauges": gauges}}
    return _frame(1, "twin.heartbeat", 1, b"i" * 16, b"", "x", 1.0, body)


@pytest.mark.parametrize("frame, where", [
    (_heartbeat({b"frontier": 1.0}), "stats.gauges"),
    (_frame(1, "mesh.error", 1, b"i" * 16, b"", "x", 1.0, {"code": "c", "message": "m", "detail": {b"k": 1}}), "detail"),
    (_frame(1, "mesh.error", 1, b"i" * 16, b"", "x", 1.0,
            {"code": "c", "message": "m", "detail": {"k": [{"ok": 1}, {b"deep": 1}]}}), "detail.k.1"),
    (_frame(1, "twin.status_reply", 1, b"i" * 16, b"", "x", 1.0,
            {**SAMPLES["twin.status_reply"].model_dump(mode="python"),
             "agents": [{**SAMPLES["twin.status_reply"].agents[0].model_dump(), "stats": {"gauges": {b"g": 1.0}}}]}),
     "agents.0.stats.gauges"),
])
def test_bin_map_keys_are_invalid_bodies_wherever_they_are(frame, where):
    """A bin key passes msgpack's strict_map_key; the codec refuses it rather than let pydantic take it for a str."""
    with pytest.raises(InvalidBody, match=rf"{where}: map keys must be str, got b'"):
        decode(frame)


def test_str_keys_and_deep_maps_still_decode():
    deep: dict = {}
    for _ in range(900):   # deeper than Python's recursion limit allows a recursive walk
        deep = {"d": deep}
    body = {"code": "c", "message": "m", "detail": {"deep": deep}}
    assert decode(_frame(1, "mesh.error", 1, b"i" * 16, b"", "x", 1.0, body)).message.detail["deep"] == deep
    assert decode(_heartbeat({"frontier": 1.0})).message.stats.gauges == {"frontier": 1.0}


def _oversized(*header) -> bytes:
    return _frame(*header, 1.0, {"payload": b"x" * 5000})


@pytest.mark.parametrize("header, readable", [
    ((1, "mesh.echo", 1, b"i" * 16, b"", "x"), True),
    ((1, 5, 1, b"i" * 16, b"", "x"), True),                 # the type does not matter for the id
    ((1, "mesh.echo", 1, b"i" * 16, b"c" * 16, "x"), True),
    ((1, "mesh.echo", 1, b"i" * 3, b"", "x"), False),       # an id that is not 16 bytes is no id
    ((1, "mesh.echo", 1, b"i" * 16, b"c" * 3, "x"), False),  # cid neither empty nor 16 bytes
    ((True, "mesh.echo", 1, b"i" * 16, b"", "x"), False),   # format true
    ((1, "mesh.echo", 1, "i" * 16, b"", "x"), False),        # id as str
    ((1, "mesh.echo", 1, b"i" * 16, b"", b"x"), False),      # sender as bin
])
def test_oversized_frames_keep_their_id_under_the_decoders_rule(header, readable):
    with pytest.raises(FrameTooLarge) as info:
        decode(_oversized(*header), max_frame_bytes=4096)
    assert info.value.msg_id == (b"i" * 16 if readable else b"")


@pytest.fixture
def small_server():
    """An RpcServer with a 4 KiB frame limit and an echo handler, on its own reactor thread."""
    ctx = zmq.Context()
    reactor = Reactor(max_wait=0.02)
    server = RpcServer(ctx, "tcp://127.0.0.1:*", sender="srv", metrics=MeshMetrics("srv", "test"), max_frame_bytes=4096)
    server.route(Echo, lambda msg, env: msg)
    server.attach(reactor)
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    yield server
    reactor.stop()
    thread.join(2)
    server.close()
    ctx.term()


@pytest.mark.parametrize("frame, code, cid", [
    (_oversized(1, "mesh.echo", 1, b"i" * 3, b"", "x"), "too_large", b""),
    (_oversized(1, 5, 1, b"i" * 16, b"", "x"), "too_large", b"i" * 16),
    (_frame(True, "mesh.echo", 1, b"i" * 16, b"", "x", 1.0, {}), "undecodable", b""),
    (_frame(1, "mesh.echo", 1, b"i" * 16, b"", "x", True, {}), "undecodable", b"i" * 16),
    (_frame(1, "mesh.echo", 1, b"i" * 16, b"", "x", 1.0, {b"seq": 1}), "invalid_body", b"i" * 16),
    (_frame(1, "mesh.error", 1, b"i" * 16, b"", "x", 1.0, {"code": "c", "message": "m", "detail": {b"k": 1}}),
     "invalid_body", b"i" * 16),
])
def test_the_server_answers_bad_frames_with_a_valid_error_frame(small_server, frame, code, cid):
    """The reply decodes under the same codec (a cid of 16 bytes or empty), with the documented code and cid."""
    with RpcClient(small_server.endpoint, max_frame_bytes=4096) as c:
        raw = c.send_raw([frame])
    env = decode(raw)
    assert isinstance(env.message, Error) and env.message.code == code, env.message
    assert env.cid == cid
