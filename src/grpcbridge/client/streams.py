"""The grpclib client stream shared by every grpcbridge channel (CPython and browser).

This module imports nothing but grpclib (and ``grpcbridge._grpclib_compat``), so the
Pyodide channel (``grpcbridge.browser``) can use it without pulling in websockets. Which
status an ended stream gets is the channel core's decision
(:meth:`grpcbridge.channel_core.CoreChannel._call_error`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpclib.client
from grpclib.exceptions import GRPCError, StreamTerminatedError

from .._grpclib_compat import retype_stream

T = TypeVar("T")


class ErrorSource(Protocol):
    """What a :class:`_TunnelStream` asks when grpclib ended it (connection lost or channel
    closed): the ``GRPCError`` to raise instead of grpclib's ``StreamTerminatedError``."""

    def call_error(self, exc: BaseException) -> GRPCError: ...


def _reported(method: Callable[..., Coroutine[Any, Any, T]]
              ) -> Callable[..., Coroutine[Any, Any, T]]:
    """``method`` of grpclib's stream, raising the channel's ``GRPCError`` instead of
    ``StreamTerminatedError``."""

    @functools.wraps(method)
    async def reporting(self: _TunnelStream, *args: Any, **kwargs: Any) -> T:
        try:
            return await method(self, *args, **kwargs)
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc

    return reporting


class _TunnelStream(grpclib.client.Stream):  # type: ignore[type-arg]
    """A grpclib client stream that reports a lost tunnel as a ``GRPCError`` (grpclib itself
    raises ``StreamTerminatedError``, which gRPC code does not expect)."""

    _bridge_channel: ErrorSource

    send_request = _reported(grpclib.client.Stream.send_request)
    send_message = _reported(grpclib.client.Stream.send_message)
    end = _reported(grpclib.client.Stream.end)
    recv_initial_metadata = _reported(grpclib.client.Stream.recv_initial_metadata)
    recv_message = _reported(grpclib.client.Stream.recv_message)
    recv_trailing_metadata = _reported(grpclib.client.Stream.recv_trailing_metadata)

    @_reported
    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_val: BaseException | None, exc_tb: TracebackType | None) -> None:
        await super().__aexit__(exc_type, exc_val, exc_tb)
        if isinstance(exc_val, StreamTerminatedError):
            raise self._bridge_channel.call_error(exc_val) from exc_val


def tunnel_stream(stream: grpclib.client.Stream,  # type: ignore[type-arg]
                  source: ErrorSource) -> _TunnelStream:
    """Turn the stream grpclib's ``Channel.request`` made into a :class:`_TunnelStream` whose
    ended streams ``source`` reports (shared by the CPython and browser channels)."""
    retyped = retype_stream(stream, _TunnelStream)
    retyped._bridge_channel = source
    return retyped
