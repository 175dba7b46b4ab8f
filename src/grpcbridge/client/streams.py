"""The grpclib client stream shared by every grpcbridge channel (CPython and browser).

This module imports nothing but grpclib (and ``grpcbridge._grpclib_compat``), so the
Pyodide channel (``grpcbridge.browser``) can use it without pulling in websockets. Which
status an ended stream gets is the channel core's decision
(:meth:`grpcbridge.channel_core.CoreChannel._call_error`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol

import grpclib.client
from grpclib.exceptions import GRPCError, StreamTerminatedError

from .._grpclib_compat import retype_stream


class ErrorSource(Protocol):
    """What a :class:`_TunnelStream` asks when grpclib ended it (connection lost or channel
    closed): the ``GRPCError`` to raise instead of grpclib's ``StreamTerminatedError``."""

    def call_error(self, exc: BaseException) -> GRPCError: ...


class _TunnelStream(grpclib.client.Stream):  # type: ignore[type-arg]
    """A grpclib client stream that reports a lost tunnel as a ``GRPCError`` (grpclib itself
    raises ``StreamTerminatedError``, which gRPC code does not expect)."""

    _bridge_channel: ErrorSource

    async def send_request(self, *, end: bool = False) -> None:
        try:
            await super().send_request(end=end)
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc

    async def send_message(self, message: Any, *, end: bool = False) -> None:
        try:
            await super().send_message(message, end=end)
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc

    async def end(self) -> None:
        try:
            await super().end()
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc

    async def recv_initial_metadata(self) -> None:
        try:
            await super().recv_initial_metadata()
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc

    async def recv_message(self) -> Any:
        try:
            return await super().recv_message()
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc

    async def recv_trailing_metadata(self) -> None:
        try:
            await super().recv_trailing_metadata()
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_val: BaseException | None, exc_tb: TracebackType | None) -> None:
        try:
            await super().__aexit__(exc_type, exc_val, exc_tb)
        except StreamTerminatedError as exc:
            raise self._bridge_channel.call_error(exc) from exc
        if isinstance(exc_val, StreamTerminatedError):
            raise self._bridge_channel.call_error(exc_val) from exc_val


def tunnel_stream(stream: grpclib.client.Stream,  # type: ignore[type-arg]
                  source: ErrorSource) -> _TunnelStream:
    """Turn the stream grpclib's ``Channel.request`` made into a :class:`_TunnelStream` whose
    ended streams ``source`` reports (shared by the CPython and browser channels)."""
    retyped = retype_stream(stream, _TunnelStream)
    retyped._bridge_channel = source
    return retyped
