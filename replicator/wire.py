"""Every message between rcopy processes (SPEC 4.14), encoded as ZeroMQ frames.

A message is a kind (``"pair.write"``), a small JSON header of named fields and
zero or more binary payload frames (volume data travels in its own frames, never
inside JSON). Frame 0 is ``VERSION`` byte + UTF-8 JSON. Decoding checks every
limit and raises ProtocolError for anything malformed; it never trusts sizes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import BY_NAME, ProtocolError, RcopyError

VERSION = 1
HEADER_BYTES_MAX = 1 << 20
PAYLOAD_FRAMES_MAX = 4096
MESSAGE_BYTES_MAX = 80 << 20  # a 64 MiB NBD request plus headroom


@dataclass
class Message:
    """One request or reply: ``kind``, JSON-safe ``fields``, binary ``payloads``."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    payloads: list[bytes | memoryview] = field(default_factory=list)   # received frames are views, never copied

    def __getitem__(self, key: str) -> Any:
        try:
            return self.fields[key]
        except KeyError:
            raise ProtocolError(f"message {self.kind!r} lacks field {key!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(msg: Message) -> list[bytes]:
    """Message -> list of frames."""
    header = json.dumps({"kind": msg.kind, "fields": msg.fields},
                        separators=(",", ":")).encode()
    if len(header) > HEADER_BYTES_MAX:
        raise ProtocolError(f"header of {msg.kind!r} too large ({len(header)} bytes)")
    return [bytes([VERSION]) + header, *msg.payloads]


def decode(frames: list[bytes] | list[memoryview]) -> Message:
    """List of frames -> Message; ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) - 1 > PAYLOAD_FRAMES_MAX:
        raise ProtocolError(f"too many frames ({len(frames)})")
    total = sum(len(f) for f in frames)
    if total > MESSAGE_BYTES_MAX:
        raise ProtocolError(f"message too large ({total} bytes)")
    head = bytes(frames[0])
    if len(head) < 1 or head[0] != VERSION:
        raise ProtocolError(f"unsupported message version {head[:1]!r}")
    if len(head) - 1 > HEADER_BYTES_MAX:
        raise ProtocolError("header too large")
    try:
        obj = json.loads(head[1:].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed header: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str) \
            or not isinstance(obj.get("fields", {}), dict):
        raise ProtocolError("malformed header: need {kind: str, fields: dict}")
    return Message(obj["kind"], obj.get("fields", {}), list(frames[1:]))


def ok(payloads: list[bytes] | None = None, **fields: Any) -> Message:
    """A success reply."""
    return Message("ok", fields, payloads or [])


def error_reply(exc: BaseException) -> Message:
    """A failure reply carrying the exception's class name and message."""
    name = type(exc).__name__ if isinstance(exc, RcopyError) else "RcopyError"
    return Message("error", {"error": name, "message": str(exc) or name})


def raise_if_error(reply: Message) -> Message:
    """Return a success reply, or raise the error a failure reply carries."""
    if reply.kind == "error":
        cls = BY_NAME.get(str(reply.get("error")), RcopyError)
        raise cls(str(reply.get("message", "remote error")))
    if reply.kind != "ok":
        raise ProtocolError(f"unexpected reply kind {reply.kind!r}")
    return reply
