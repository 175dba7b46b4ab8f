"""Lazy access to Pyodide's JavaScript bridge (``js`` and ``pyodide.ffi``).

These modules exist only inside Pyodide. Importing them lazily keeps ``grpcbridge.browser``
importable under CPython, so linters, type checkers and documentation tools can read it.
"""

from __future__ import annotations

from typing import Any


def js() -> Any:
    """Pyodide's ``js`` module (the JavaScript global scope)."""
    try:
        import js as js_module  # type: ignore[import-not-found]  # only exists in Pyodide
    except ImportError:  # pragma: no cover - CPython
        raise RuntimeError(
            "grpcbridge.browser needs Pyodide (Python in a browser, web worker or Node); "
            "under CPython use grpcbridge.Channel instead") from None
    return js_module


def ffi() -> Any:
    """Pyodide's ``pyodide.ffi`` module."""
    import pyodide.ffi as ffi_module  # type: ignore[import-not-found]  # only in Pyodide
    return ffi_module


def page_location() -> tuple[str, str] | None:
    """``(location.protocol, location.host)`` of the page or worker, or ``None`` where
    there is no location (Node)."""
    location = getattr(js(), "location", None)
    if location is None:
        return None
    protocol = getattr(location, "protocol", None)
    host = getattr(location, "host", None)
    if not isinstance(protocol, str) or not isinstance(host, str) or not host:
        return None  # e.g. file:// or about:blank pages: no host to connect to
    return protocol, host


def navigator_online() -> bool | None:
    """``navigator.onLine``, or ``None`` where the runtime has no such flag."""
    try:
        navigator = getattr(js(), "navigator", None)
        online = getattr(navigator, "onLine", None) if navigator is not None else None
    except Exception:  # pragma: no cover - exotic runtimes
        return None
    return online if isinstance(online, bool) else None
