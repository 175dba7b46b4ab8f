"""Experiments for benchmarks/native.py: candidate changes to grpcbridge, tried by patching
it at run time in the benchmark's own processes (never in src/). ``native.py --experiment
NAME`` adds paths LX and GX: LW and GW again, with a second pair of server processes and
clients started with ``--experiment NAME`` (they call :func:`apply`), measured in the same
interleaved rounds as the unpatched paths.

* ``coalesce`` -- the in-process pipe (``grpcbridge.pipe.ProtocolTransport``) collects the
  writes grpclib makes within one event-loop callback and sends them as one WebSocket
  message (flushed by ``loop.call_soon``, or at once beyond 256 KiB). grpclib writes every
  HTTP/2 frame separately (HEADERS, each DATA frame of at most 16 KiB, WINDOW_UPDATE...);
  on a socket each write is one ``send``, through the pipe each is also one WebSocket frame
  (header, mask key from ``getrandom`` and masking on the client, parsing on the peer).
"""

from __future__ import annotations

from typing import Any

EXPERIMENTS = ("coalesce",)
_CORK_LIMIT = 256 * 1024


def _coalesce() -> None:
    from grpcbridge import pipe

    transport_cls: Any = pipe.ProtocolTransport

    def write(self: Any, data: bytes | bytearray | memoryview) -> None:
        if self._pipe.closed:
            return
        cork = self.__dict__.get("_cork")
        if cork is None:
            self._cork = cork = []
            self._cork_size = 0
            self._pipe.tunnel.loop.call_soon(self._flush_cork)
        cork.append(bytes(data))
        self._cork_size += len(data)
        if self._cork_size >= _CORK_LIMIT:
            self._flush_cork()

    def flush(self: Any) -> None:
        chunks = self.__dict__.get("_cork")
        if not chunks:
            return
        self._cork = None  # the next write re-arms a flush; a pending one finds nothing
        self._cork_size = 0
        if not self._pipe.closed:
            self._pipe.tunnel.stream_data(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def close(self: Any) -> None:
        self._flush_cork()
        self._pipe.close_from_protocol(None)

    def get_write_buffer_size(self: Any) -> int:
        return int(self._pipe.tunnel.websocket_buffer_size() + self.__dict__.get("_cork_size", 0))

    transport_cls.write = write
    transport_cls.writelines = lambda self, chunks: write(self, b"".join(chunks))
    transport_cls._flush_cork = flush
    transport_cls.close = close
    transport_cls.get_write_buffer_size = get_write_buffer_size


def apply(name: str) -> None:
    if name == "coalesce":
        _coalesce()
    elif name:
        raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")

