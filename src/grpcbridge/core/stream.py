"""Rules for carrying one HTTP/2 byte stream inside WebSocket messages.

See ``wire-protocol``: binary messages only, message boundaries carry no meaning, empty
messages are skipped, a text message is a protocol violation (close 1003), a message above
the size limit closes with 1009. Every adapter applies these rules through
:class:`~grpcbridge.core.tunnel.TunnelMachine`.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """WebSocket close codes grpcbridge sends (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


#: Most bytes of UTF-8 a close frame's reason may hold (RFC 6455 section 5.5: 125 - 2 for the code).
MAX_CLOSE_REASON_BYTES = 123
#: Default limit for one WebSocket message (the Go project's read limit).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Bytes a relay may hold for one direction of one tunnel before it stops reading the
#: sending side (transport pause/resume). The resume point is a quarter of it.
DEFAULT_BUFFER_BYTES = 256 * 1024


class Opcode(enum.Enum):
    """The kinds of WebSocket data frames :meth:`~grpcbridge.core.tunnel.TunnelMachine.frame`
    takes (binary payloads go to its ``data``)."""

    TEXT = "text"
    CONTINUATION = "continuation"


def fit_close_reason(text: str) -> str:
    """``text`` cut to fit in a close frame (``...`` marks a cut; never inside a character)."""
    encoded = text.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return text
    return encoded[:MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


def message_too_big_reason(limit: int) -> str:
    """Close reason for a message above ``limit`` bytes (it fits in a close frame)."""
    return f"message larger than the {limit} byte limit"
