"""Event-loop choice for the loops grpcbridge creates itself (the CLI, the threaded bridge).

``"auto"`` (the default) takes uvloop when it is installed (it is a dependency of grpcbridge
except on Windows) and asyncio's own loop otherwise; ``"uvloop"`` insists on uvloop;
``"asyncio"`` never uses it. uvloop cuts the relay's CPU per message by about a quarter
(docs/benchmarks.md). Code that runs the bridge on its own loop (``await bridge.start()``,
ASGI servers) keeps whatever loop it has.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from .core.errors import ConfigError

T = TypeVar("T")
LoopName = Literal["auto", "asyncio", "uvloop"]
LOOP_NAMES: tuple[LoopName, ...] = ("auto", "asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The constructor of a new event loop of kind ``name`` (one of :data:`LOOP_NAMES`)."""
    if name not in LOOP_NAMES:
        raise ConfigError(f"loop must be one of {', '.join(LOOP_NAMES)}, not {name!r}")
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if name == "auto":
            return asyncio.new_event_loop
        raise ConfigError("loop 'uvloop' needs uvloop (pip install uvloop; it does not run "
                          "on Windows), or choose loop 'auto' or 'asyncio'") from None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: what kind of loop ``loop`` is (for logs)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """``asyncio.run(main)`` on a new loop of kind ``loop`` (for the CLI and the demo)."""
    try:
        factory = loop_factory(loop)
    except ConfigError:
        main.close()  # never awaited
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache  # once per process
def tune_allocator() -> bool:
    """Keep glibc's malloc from returning memory to the kernel after every large message.

    A relay allocates and frees a 16-256 KiB buffer per message. With glibc's defaults the
    top of the heap is trimmed (``brk``) and re-grown about five times per MiB relayed, and
    each re-grown page faults again: a third of the bridge's system time in
    benchmarks/profile_relay.py, and 10x the page faults (half its CPU) in a
    ``grpcbridge.Channel`` streaming 64 KiB messages. Chunks under 1 MiB now come from the
    heap and up to 8 MiB of free heap is kept. Called by ``grpcbridge serve/forward`` and
    by every CPython client's first dial (:func:`grpcbridge.client.dial.open_websocket`:
    ``Channel``, ``aio_channel``/``sync_channel``, ``Forwarder``); a no-op (False) where the
    C library is not glibc, or when ``GRPCBRIDGE_MALLOC_TUNING=0``.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("GRPCBRIDGE_MALLOC_TUNING") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 8 << 20))
