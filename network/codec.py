"""Frame codec: one msgpack array per message, checked before anything else sees it.

    [1, type_name, version, id, cid, sender, ts, body]

`1` is the frame format, `id` 16 random bytes, `cid` the id of the request this answers
(empty otherwise), `ts` seconds since the epoch, `body` the model's fields as a map.
docs/PROTOCOL.md is the exact description.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, get_args, get_origin

import msgpack
from pydantic import BaseModel, ValidationError

from network.messages import ErrorCode, Message, lookup

FRAME_FORMAT = 1
DEFAULT_MAX_FRAME_BYTES = 1 << 20

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


class ProtocolError(Exception):
    """A frame that cannot be turned into a message. Carries what could be read of its header."""

    code: ErrorCode = ErrorCode.UNDECODABLE

    def __init__(self, message: str, *, msg_id: bytes = b"", sender: str = "", type_name: str = "", detail: dict | None = None):
        super().__init__(message)
        self.msg_id = msg_id
        self.sender = sender
        self.type_name = type_name
        self.detail = detail or {}


class Undecodable(ProtocolError):
    code = ErrorCode.UNDECODABLE


class FrameTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class UnknownType(ProtocolError):
    code = ErrorCode.UNKNOWN_TYPE


class VersionMismatch(ProtocolError):
    code = ErrorCode.BAD_VERSION


class InvalidBody(ProtocolError):
    code = ErrorCode.INVALID_BODY


@dataclass(slots=True)
class Envelope:
    """A decoded frame: the header fields and the validated message."""

    message: Message
    id: bytes
    cid: bytes
    sender: str
    ts: float

    @property
    def type_name(self) -> str:
        return self.message.type_name


_ids: list[bytes] = []  # random ids drawn 256 at a time: one getrandom() call per 256 messages
os.register_at_fork(after_in_child=_ids.clear)  # a forked child must not reuse its parent's ids


def new_id() -> bytes:
    while True:
        try:
            return _ids.pop()
        except IndexError:
            block = os.urandom(16 * 256)
            _ids.extend([block[i:i + 16] for i in range(0, len(block), 16)])


def encode(message: Message, *, sender: str, cid: bytes = b"", msg_id: bytes | None = None) -> tuple[bytes, bytes]:
    """Returns (message id, frame)."""
    mid = msg_id or new_id()
    # what message.model_dump() does, without its keyword-argument plumbing (~0.3 us)
    body = message.__pydantic_serializer__.to_python(message)
    frame = _packb([FRAME_FORMAT, message.type_name, message.version, mid, cid, sender, time.time(), body])
    return mid, frame


def _peek_header(frame: bytes) -> tuple[bytes, str, str]:
    """Id, sender and type of an oversized frame, read without unpacking its body, so the
    error reply can still be correlated. The id is readable under the same rule as in `decode`
    (format 1, id bin of 16 bytes, cid bin of 0 or 16, sender str); the type does not matter.
    Empty values when the header is not readable."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame))
    try:
        unpacker.feed(frame)
        if unpacker.read_array_header() != 8:
            return b"", "", ""
        fmt = unpacker.unpack()
        if type(fmt) is not int or fmt != FRAME_FORMAT:
            return b"", "", ""
        type_name, _version, mid, cid, sender = (unpacker.unpack() for _ in range(5))
    except Exception:
        return b"", "", ""
    if (type(mid) is not bytes or len(mid) != 16 or type(cid) is not bytes or len(cid) not in (0, 16)
            or type(sender) is not str):
        return b"", "", ""
    return mid, sender, type_name if type(type_name) is str else ""


def _has_maps(annotation: Any, seen: set) -> bool:
    """Whether a field of this type can hold a map that no model validates (dict or Any fields, also
    inside lists and nested models): pydantic's lax mode would take bin keys there as str."""
    if annotation is Any or annotation is dict or get_origin(annotation) is dict:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation in seen:
            return False
        seen.add(annotation)
        return any(_has_maps(f.annotation, seen) for f in annotation.model_fields.values())
    return any(_has_maps(a, seen) for a in get_args(annotation))


_maps: dict[type[Message], bool] = {}  # per type: does its body need the map-key walk below


def _bad_key(body: dict) -> tuple[str, object] | None:
    """Where a map of the body has a key that is not str (msgpack's strict_map_key lets bin through),
    and that key; None when every key is str. Iterative: msgpack allows deeper nesting than Python's
    recursion limit."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if type(value) is dict:
            for k, v in value.items():
                if type(k) is not str:
                    return ".".join(map(str, path)) or "<body>", k
                if type(v) is dict or type(v) is list:
                    stack.append((v, (*path, k)))
        else:
            for i, v in enumerate(value):
                if type(v) is dict or type(v) is list:
                    stack.append((v, (*path, i)))
    return None


def decode(frame: bytes, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Envelope:
    """Turns a frame into an Envelope or raises a ProtocolError subclass saying what is wrong."""
    if len(frame) > max_frame_bytes:
        mid, sender, type_name = _peek_header(frame)
        raise FrameTooLarge(f"frame of {len(frame)} bytes is over the limit of {max_frame_bytes} bytes",
                            msg_id=mid, sender=sender, type_name=type_name,
                            detail={"size": len(frame), "limit": max_frame_bytes})
    try:
        raw = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise Undecodable(f"frame is not valid msgpack: {exc or type(exc).__name__}") from None
    # `type(...) is int`: msgpack's true is a Python bool, which equals 1
    if type(raw) is not list or len(raw) != 8 or type(raw[0]) is not int or raw[0] != FRAME_FORMAT:
        raise Undecodable("frame is not a mesh envelope: expected an array of 8 starting with 1")
    _, type_name, version, mid, cid, sender, ts, body = raw
    if not isinstance(mid, bytes) or not isinstance(cid, bytes) or not isinstance(sender, str):
        raise Undecodable("envelope header has wrong field types (id and cid must be bin, sender str)")
    if len(mid) != 16 or len(cid) not in (0, 16):
        raise Undecodable("id must be 16 bytes, and cid 16 bytes or empty", sender=sender)
    if not isinstance(type_name, str) or type(version) is not int or (type(ts) is not float and type(ts) is not int):
        raise Undecodable("envelope header has wrong field types (type str, version int, ts float)", msg_id=mid, sender=sender)
    cls = lookup(type_name)
    if cls is None:
        raise UnknownType(f"unknown message type {type_name!r}", msg_id=mid, sender=sender, type_name=type_name)
    if version != cls.version:
        raise VersionMismatch(f"{type_name} version {version} is not supported (this agent speaks version {cls.version})",
                              msg_id=mid, sender=sender, type_name=type_name,
                              detail={"got": version, "supported": cls.version})
    if not isinstance(body, dict):
        raise InvalidBody(f"{type_name} body must be a map", msg_id=mid, sender=sender, type_name=type_name)
    maps = _maps.get(cls)
    if maps is None:
        maps = _maps[cls] = _has_maps(cls, set())
    if maps and (bad := _bad_key(body)) is not None:
        raise InvalidBody(f"{type_name} body is invalid: {bad[0]}: map keys must be str, got {bad[1]!r}",
                          msg_id=mid, sender=sender, type_name=type_name)
    try:
        # what cls.model_validate(body) does, without its keyword-argument plumbing (~0.3 us)
        message = cls.__pydantic_validator__.validate_python(body)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()[:10]]
        raise InvalidBody(f"{type_name} body is invalid: {'; '.join(problems)}", msg_id=mid, sender=sender,
                          type_name=type_name) from None
    return Envelope(message, mid, cid, sender, float(ts))
