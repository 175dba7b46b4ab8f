"""Raw-bytes echo service for grpclib (benchmarks/native.py), no proto file.

``bench.Echo/Unary`` and ``bench.Echo/Stream``, the same method names as the grpcio server
in benchmarks/echo_server.py, so one grpclib client talks to both. Messages are ``bytes``
end to end: :class:`BytesCodec` passes them through untouched, so no protobuf cost is in
the figures. Its content subtype is ``proto`` (``application/grpc+proto``), which grpcio
servers accept and grpclib servers expect by default.
"""

from __future__ import annotations

from typing import Any

from grpclib.const import Cardinality, Handler
from grpclib.encoding.base import CodecBase

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"


class BytesCodec(CodecBase):
    """Identity codec: a message is its bytes."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message  # type: ignore[no-any-return]

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


class EchoService:
    """grpclib handler object (anything with ``__mapping__`` is servable)."""

    async def unary(self, stream: Any) -> None:
        request = await stream.recv_message()
        await stream.send_message(request)

    async def stream(self, stream: Any) -> None:
        async for message in stream:
            await stream.send_message(message)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            UNARY: Handler(self.unary, Cardinality.UNARY_UNARY, bytes, bytes),
            STREAM: Handler(self.stream, Cardinality.STREAM_STREAM, bytes, bytes),
        }
