"""Real grpcio channels (``grpc.aio.Channel`` and ``grpc.Channel``) to a WebSocket target.

grpcio cannot dial over an arbitrary byte stream, so each channel gets a private
in-process :class:`~grpcbridge.Forwarder` listening on a unix socket that only this user can
reach (a fresh 0700 directory, the socket 0600); both are removed when the channel closes::

    async with grpcbridge.aio_channel("ws://127.0.0.1:8080/grpc") as channel:
        reply = await TodoServiceStub(channel).ListTodos(ListTodosRequest())

    with grpcbridge.sync_channel("ws://127.0.0.1:8080/grpc") as channel:   # no asyncio needed
        reply = TodoServiceStub(channel).ListTodos(ListTodosRequest())
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from ..core.config import ForwarderConfig
from ..loops import loop_factory
from .forwarder import Forwarder


async def _start_forwarder(target: str, options: dict[str, Any]) -> tuple[Forwarder, str]:
    """A started forwarder listening on a unix socket (made 0600) in a fresh directory
    (mkdtemp's: 0700); the forwarder and the directory, removed if the start fails."""
    directory = tempfile.mkdtemp(prefix="grpcbridge-")
    path = os.path.join(directory, "tunnel.sock")
    try:
        forwarder = Forwarder(ForwarderConfig(target=target, listen=f"unix:{path}", **options))
        await forwarder.start()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return forwarder, directory


class _StubFactories:
    """The four multi-callable factories generated stubs call, handed to the wrapped
    grpcio channel (shared by :class:`AioChannel` and :class:`SyncChannel`)."""

    _channel: Any

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.stream_stream(method, *args, **kwargs)


class AioChannel(_StubFactories, grpc.aio.Channel):
    """A ``grpc.aio.Channel`` whose connections go through a private forwarder."""

    _channel: grpc.aio.Channel

    def __init__(self, channel: grpc.aio.Channel, forwarder: Forwarder, directory: str) -> None:
        self._channel = channel
        self._forwarder = forwarder
        self._directory = directory
        self._closed = False

    async def close(self, grace: float | None = None) -> None:
        """Close the channel, the forwarder and its socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._channel.close(grace)
        finally:
            await self._forwarder.close()
            shutil.rmtree(self._directory, ignore_errors=True)

    async def __aenter__(self) -> AioChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()


async def aio_channel(target: str, *, options: Sequence[tuple[str, Any]] = (),
                      **tunnel: Any) -> AioChannel:
    """A ``grpc.aio.Channel`` reaching the WebSocket ``target`` (must run in the event loop
    that uses it). ``options`` are grpcio channel options; ``tunnel`` takes
    :class:`~grpcbridge.ForwarderConfig` fields (``bearer_token``, ``headers``, ``cacert``,
    ``subprotocols``, ``proxy``, ``handshake_timeout``...)."""
    forwarder, directory = await _start_forwarder(target, tunnel)
    channel = grpc.aio.insecure_channel(forwarder.config.listen, options=list(options))
    return AioChannel(channel, forwarder, directory)


class SyncChannel(_StubFactories, grpc.Channel):
    """A synchronous ``grpc.Channel`` reaching the WebSocket ``target``; its forwarder runs
    on a private event loop thread. Arguments as for :func:`aio_channel`."""

    _channel: grpc.Channel

    def __init__(self, target: str, *, options: Sequence[tuple[str, Any]] = (),
                 **tunnel: Any) -> None:
        self._loop = loop_factory("auto")()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpcbridge-channel",
                                        daemon=True)
        self._closed = False
        self._thread.start()
        # The timeout runs on the loop, so a start that times out has removed its directory.
        start = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(_start_forwarder(target, tunnel), 30), self._loop)
        try:
            self._forwarder, self._directory = start.result()
        except BaseException:  # failed, or interrupted: a cancelled start cleans up too
            if not start.cancel() and start.exception() is None:  # it started meanwhile
                forwarder, directory = start.result()
                asyncio.run_coroutine_threadsafe(forwarder.close(), self._loop).result(30)
                shutil.rmtree(directory, ignore_errors=True)
            self._stop_loop()
            raise
        self._channel = grpc.insecure_channel(self._forwarder.config.listen,
                                              options=list(options))

    def _stop_loop(self) -> None:
        async def settle() -> None:  # on the loop's thread: let cancelled tasks clean up
            if others := asyncio.all_tasks() - {asyncio.current_task()}:
                await asyncio.wait(others, timeout=5)
            asyncio.get_running_loop().stop()

        asyncio.run_coroutine_threadsafe(settle(), self._loop)
        self._thread.join(30)
        self._loop.close()

    def close(self) -> None:
        """Close the channel, the forwarder, its thread and its socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._channel.close()
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._forwarder.close(), self._loop).result(30)
            self._stop_loop()
            shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> SyncChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self._channel.unsubscribe(callback)


#: ``sync_channel(target, *, options=(), **tunnel)``: the class, named like :func:`aio_channel`.
sync_channel = SyncChannel
