"""HTTP/1.1 request handling shared by the bridge's listener and the metrics listener, built
on websockets' request parser: one request per connection, answered before anything else."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from websockets.exceptions import RequestLineTooLong
from websockets.http11 import Request
from websockets.server import ServerProtocol

from ..core.target import SocketAddress
from ..relay import websockets_logger

_END_OF_HEAD = b"\r\n\r\n"
_TEXT = "text/plain; charset=utf-8"


class RequestHead:
    """Finds where the head of the first HTTP request ends (its blank line), across reads.

    websockets' server protocol parses frames right after the request; bytes that follow
    the request in the same read (a pipelined request, frames sent before the 101) would be
    parsed before the request is answered, and a parse error there would end the
    connection without an answer. :meth:`feed` gives websockets the head only and keeps the
    rest aside until the answer is sent.
    """

    __slots__ = ("_tail", "complete", "size")

    def __init__(self) -> None:
        self._tail = b""
        self.complete = False
        #: Bytes of the head seen so far (all of it once :attr:`complete`).
        self.size = 0

    def feed(self, parser: ServerProtocol, data: bytes) -> tuple[Request | None, bytes]:
        """Give ``parser`` the part of ``data`` up to the end of the head (call it until
        :attr:`complete`): returns the request once parsed, and the bytes that follow the
        head."""
        window = self._tail + data
        end = window.find(_END_OF_HEAD)
        if end < 0:
            self._tail = window[-3:]
            cut = len(data)
        else:
            self.complete = True
            cut = end + len(_END_OF_HEAD) - len(self._tail)
        self.size += cut
        parser.receive_data(data[:cut])
        request = next((e for e in parser.events_received() if isinstance(e, Request)), None)
        return request, data[cut:]


def answer_malformed(parser: ServerProtocol) -> tuple[int, list[bytes], str]:
    """After websockets failed to parse a request: the status, the bytes to send (websockets'
    own 414/431 answer, or a 400 it does not write itself) and a reason for the log."""
    error = parser.handshake_exc
    chunks = [chunk for chunk in parser.data_to_send() if chunk]
    if chunks:  # websockets answered a request line or headers over its limits
        status = 414 if isinstance(error, RequestLineTooLong) else 431
        detail = str(error)
    else:
        status = 400
        chunks = [parser.reject(400, "malformed HTTP request\n").serialize()]
        cause = error.__cause__ if error is not None and error.__cause__ else error
        detail = str(cause)
    return status, chunks, f"malformed HTTP request: {detail[:120]}"


def send_response(parser: ServerProtocol, status: int, headers: Iterable[tuple[str, str]],
                  body: bytes) -> None:
    """Answer the request ``parser`` read: ``status``, ``headers``, ``body`` (and its
    ``Content-Length``)."""
    response = parser.reject(status, "")
    response.body = body
    # reject() already set both for its empty body, and websockets' Headers append on
    # assignment: replace them, or clients read "Content-Length: 0" (an empty /metrics).
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    for name, value in headers:
        response.headers[name] = value
    response.headers["Content-Length"] = str(len(body))
    parser.send_response(response)


class HttpServer:
    """A metrics listener, until :meth:`close`: ``/metrics`` from ``registry``,
    ``/healthz``, and ``/readyz``: 200, or 503 with the reason ``not_ready()`` gives. One
    request per connection, read and answered within :attr:`TIMEOUT` seconds."""

    TIMEOUT = 10.0

    def __init__(self, registry: CollectorRegistry,
                 not_ready: Callable[[], Awaitable[str | None]]) -> None:
        self._registry = registry
        self._not_ready = not_ready
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def answer(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for a request of ``path`` (without query)."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        if path == "/readyz":
            reason = await self._not_ready()
            if reason is None:
                return 200, _TEXT, b"ready\n"
            return 503, _TEXT, f"{reason}\n".encode()
        return 404, _TEXT, b"not found; try /metrics, /healthz or /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        parser = ServerProtocol(logger=websockets_logger)
        head = RequestHead()
        request = None
        try:
            if self._server is None:  # accepted as the listener closed
                raise asyncio.CancelledError
            async with asyncio.timeout(self.TIMEOUT):
                while not head.complete and parser.handshake_exc is None:
                    if not (data := await reader.read(65536)):
                        break  # the client left before its request was complete
                    request, _rest = head.feed(parser, data)
                if parser.handshake_exc is not None:
                    writer.writelines(answer_malformed(parser)[1])
                elif request is not None:  # a pipelined request is not read
                    try:
                        status, content_type, body = await self.answer(
                            request.path.partition("?")[0])
                    except Exception:  # pragma: no cover - reported as 500
                        status, content_type, body = 500, _TEXT, b"internal error\n"
                    send_response(parser, status, [("Content-Type", content_type)], body)
                    writer.writelines(parser.data_to_send())
                # Within the timeout: a client that never reads its answer is dropped.
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def start(self, address: SocketAddress) -> tuple[str, int]:
        """Listen on ``address`` (host and port); returns the bound host and port."""
        self._server = await asyncio.start_server(self._serve, address.host, address.port)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
