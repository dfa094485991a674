"""Hypothesis strategies for bad frames, shared by the socket fuzz tests.

The same families as tests/test_fuzz.py (random bytes, envelopes with wrong fields, valid frames mangled),
plus the expected verdict of a receiver, computed with the reference codec, so a test can check that every
rejection was counted, exactly.
"""

from __future__ import annotations

import os

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from network.codec import ProtocolError, decode, encode
from tests.samples import SAMPLES

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))

# Types every agent process knows (network.messages). A receiver that has not imported a type's module answers
# unknown_type where this process would find a body error, so frames are built from these only.
CORE_SAMPLES = [m for m in SAMPLES.values() if type(m).__module__ == "network.messages"]
CORE_TYPES = sorted(m.type_name for m in CORE_SAMPLES)

FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)


@st.composite
def envelopes(draw, sender: str = "fuzz"):
    """Valid msgpack shaped like a frame, with one or more fields wrong (or cut short)."""
    fields = [
        draw(st.sampled_from([1, 1, 1, 0, 2, "1"])),
        draw(st.sampled_from(CORE_TYPES) | st.text(max_size=12)),
        draw(st.sampled_from([1, 1, 2, -1, "1"])),
        draw(st.binary(min_size=16, max_size=16) | st.binary(max_size=20)),
        draw(st.just(b"") | st.binary(min_size=16, max_size=16) | st.binary(max_size=20)),
        draw(st.just(sender) | st.text(max_size=10) | st.integers(-(2**31), 2**31)),
        draw(st.floats() | st.integers(-(2**31), 2**31)),
        draw(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5) | msgpack_values),
    ]
    cut = draw(st.integers(0, 9))
    return msgpack.packb(fields[:cut] if cut < 8 else fields, use_bin_type=True)


@st.composite
def wrong_fields(draw, sender: str = "fuzz"):
    """A real type's sample body with a field removed, retyped or added: valid msgpack, invalid body."""
    msg = draw(st.sampled_from(CORE_SAMPLES))
    body = msg.__pydantic_serializer__.to_python(msg)
    how = draw(st.sampled_from(["drop", "retype", "extra"] if body else ["extra"]))
    if how == "drop":
        body.pop(draw(st.sampled_from(sorted(body))))
    elif how == "retype":
        body[draw(st.sampled_from(sorted(body)))] = draw(msgpack_values)
    else:
        body[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in body))] = draw(msgpack_values)
    return msgpack.packb([1, msg.type_name, msg.version, os.urandom(16), b"", sender, 1.7e9, body], use_bin_type=True)


@st.composite
def mangled_valid(draw, sender: str = "fuzz"):
    """A valid frame of a real type, then truncated, extended or bit-flipped, or left valid."""
    _, frame = encode(draw(st.sampled_from(CORE_SAMPLES)), sender=sender)
    how = draw(st.sampled_from(["truncate", "append", "flip", "valid"]))
    if how == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if how == "append":
        return frame + draw(st.binary(min_size=1, max_size=10))
    if how == "flip":
        i = draw(st.integers(0, len(frame) - 1))
        return frame[:i] + bytes([frame[i] ^ draw(st.integers(1, 255))]) + frame[i + 1:]
    return frame


def frames(sender: str = "fuzz"):
    return (st.binary(max_size=64) | envelopes(sender) | wrong_fields(sender) | mangled_valid(sender)
            | msgpack_values.map(lambda v: msgpack.packb(v)))


def verdict(frame: bytes, max_frame_bytes: int) -> str:
    """'ok' or the error code a receiver with the reference codec gives this frame."""
    try:
        decode(frame, max_frame_bytes=max_frame_bytes)
    except ProtocolError as exc:
        return str(exc.code)
    return "ok"


def event_verdict(parts: list[bytes], max_frame_bytes: int, publisher: str | None = None) -> str:
    """What a subscriber makes of a published message (docs/PROTOCOL.md, Publish/subscribe); with `publisher`, the
    agent subscribed to: a valid event that names another sender is never believed (`unexpected_event`)."""
    if len(parts) != 2:
        return "undecodable"
    try:
        parts[0].decode()
    except UnicodeDecodeError:
        return "undecodable"
    code = verdict(parts[1], max_frame_bytes)
    if code == "ok" and publisher is not None and decode(parts[1], max_frame_bytes=max_frame_bytes).sender != publisher:
        return "unexpected_event"
    return code
