"""Two-line attachment of an existing grpcio server, and a bridge on its own thread.

::

    server = grpc.server(futures.ThreadPoolExecutor())   # your server, as before
    add_TodoServiceServicer_to_server(TodoServicer(), server)
    bridge = grpcbridge.attach_grpcio(server, listen="127.0.0.1:8080")  # before start()
    server.start(); bridge.start()                        # bridge runs on its own thread

With ``grpc.aio.server()`` pass ``threaded=False`` and ``await bridge.start()`` in your loop.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Literal, overload

from ..backends import GrpcioBackend
from ..core.config import BridgeConfig
from ..core.errors import InvalidStateError
from ..loops import LoopName, loop_factory, loop_name
from .bridge import Bridge


class ThreadedBridge:
    """Runs a :class:`Bridge` on a private event loop in a daemon thread (for programs
    without asyncio, such as a synchronous grpcio server).

    ``loop`` picks that loop: ``"auto"`` (uvloop when installed, else asyncio),
    ``"asyncio"`` or ``"uvloop"``; see :mod:`grpcbridge.loops`."""

    def __init__(self, config: BridgeConfig, *, loop: LoopName = "auto") -> None:
        self.config = config
        self._loop_factory = loop_factory(loop)  # fails here, not in the thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bridge: Bridge | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False

    def _state(self) -> str:
        """What this bridge did, as a phrase: "has not started", "is running"..."""
        if self._thread is None:
            return "was stopped" if self._stopped else "has not started"
        if self._error is not None:
            return "failed to start"
        return "was stopped" if self._stopped else "is running"

    def _not_started(self, what: str) -> InvalidStateError:
        state = self._state()
        advice = ("call start() first (or use 'with ThreadedBridge(...)')"
                  if state == "has not started" else "create a new ThreadedBridge")
        return InvalidStateError(f"ThreadedBridge.{what} is known once the bridge thread "
                                 f"has started; this one {state}: {advice}")

    @property
    def bridge(self) -> Bridge:
        """The :class:`Bridge` running on the thread (after :meth:`start`)."""
        if self._bridge is None:
            raise self._not_started("bridge")
        return self._bridge

    @property
    def url(self) -> str:
        """The ``ws://`` / ``wss://`` URL of the tunnel endpoint (after :meth:`start`)."""
        if self._bridge is None:
            raise self._not_started("url")
        return self._bridge.url

    @property
    def loop_kind(self) -> str:
        """``"uvloop"`` or ``"asyncio"``: the loop the bridge thread runs (once started)."""
        if self._loop is None:
            raise self._not_started("loop_kind")
        return loop_name(self._loop)

    def start(self, timeout: float = 10.0) -> ThreadedBridge:
        """Start the thread and return once the bridge listens (or raise its error)."""
        if self._thread is not None or self._stopped:
            raise InvalidStateError(
                f"start() called on a ThreadedBridge that {self._state()}; it starts "
                "once: " + ("it is already serving" if self._state() == "is running"
                            else "create a new ThreadedBridge"))
        self._thread = threading.Thread(target=self._run, name="grpcbridge", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the bridge did not start within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            self._loop = runner.get_loop()
            runner.run(self._main())

    async def _main(self) -> None:
        bridge = Bridge(self.config)
        try:
            await bridge.start()
            self._bridge = bridge
        except BaseException as exc:
            self._error = exc
            return
        finally:
            self._ready.set()
        await bridge.serve_forever()

    def stop(self, drain_timeout: float | None = None, timeout: float = 30.0) -> None:
        """Drain and close the bridge, then join the thread. Idempotent."""
        stopped, self._stopped = self._stopped, True
        if stopped or self._thread is None:
            return
        if self._loop is not None and self._bridge is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._bridge.close(drain_timeout),
                                                      self._loop)
            future.result(timeout)
        self._thread.join(timeout)

    def __enter__(self) -> ThreadedBridge:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@overload
def attach_grpcio(server: Any, *, threaded: Literal[True] = ..., loop: LoopName = ...,
                  **config: Any) -> ThreadedBridge: ...
@overload
def attach_grpcio(server: Any, *, threaded: Literal[False], **config: Any) -> Bridge: ...


def attach_grpcio(server: Any, *, threaded: bool = True, loop: LoopName | None = None,
                  **config: Any) -> ThreadedBridge | Bridge:
    """Serve an existing grpcio server (``grpc.server`` or ``grpc.aio.server``) over
    WebSocket. Call before ``server.start()``: a private unix-socket port (0600, in a 0700
    directory) is added to the server and the bridge relays to it. ``config`` takes the
    :class:`BridgeConfig` fields (``listen``, ``path``, guards...).

    ``threaded=True`` (the default) returns a :class:`ThreadedBridge` with its own thread
    and event loop (``loop``: ``"auto"``, ``"asyncio"`` or ``"uvloop"``); this suits
    ``grpc.aio`` servers too, and with uvloop it had the lower latency there
    (docs/benchmarks.md, path GU).
    ``threaded=False`` returns a :class:`Bridge` to ``await bridge.start()`` on your loop."""
    if "backend" in config:
        raise TypeError("attach_grpcio() chooses the backend itself; do not pass backend=")
    if not threaded and loop is not None:
        raise TypeError("loop= applies to threaded=True only: with threaded=False the bridge "
                        "runs on the event loop that awaits bridge.start()")
    bridge_config = BridgeConfig(backend=GrpcioBackend(server), **config)
    if threaded:
        return ThreadedBridge(bridge_config, loop=loop or "auto")
    return Bridge(bridge_config)
