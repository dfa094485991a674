"""The frame codec on its own: every message type round-trips, every bad frame gets its own error."""

from __future__ import annotations

import msgpack
import pytest

from mesh.messages import Register
from network import codec
from network.codec import FrameTooLarge, InvalidBody, Undecodable, UnknownType, VersionMismatch, decode, encode
from network.messages import Echo, Ping
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
