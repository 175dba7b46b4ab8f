"""The browser demo's server: the Todo app in a page, with Python in the page talking gRPC.

One process, one port, no external services::

    http://127.0.0.1:8080/            the page (grpcbridge/demo/web: index.html, loader.js, ...)
    http://127.0.0.1:8080/pyodide/    the Pyodide runtime (npm package ``pyodide``); the page uses
                                      /pyodide/<version>/, cached for a year
    http://127.0.0.1:8080/wheels/     the wheels Pyodide installs (build/browser, manifest.json)
    http://127.0.0.1:8080/_demo/      config.json: where the page finds the above
    ws://127.0.0.1:8080/grpc          the tunnel: grpclib TodoService in process (SQLite store)

The service refuses empty todos and todos longer than ``--max-text-length`` characters
(default :data:`grpcbridge.demo.MAX_TEXT_LENGTH`) with ``INVALID_ARGUMENT``; the page
shows the message.

The page boots Pyodide, installs the wheels, imports :mod:`grpcbridge.demo.web_app` from the
grpcbridge wheel and runs its ``main()``: a Todo app whose every read and write is a gRPC call
made by Python in the page through :class:`grpcbridge.browser.Channel`.

Run it with ``python -m grpcbridge.demo.web`` (``--help`` for the options) after ``npm ci`` and
``python scripts/build_browser_bundle.py`` in the repository root, or from Python with
:func:`run_web_demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from ..core.errors import ConfigError
from ..core.target import host_port
from ..loops import run
from ..server.static import Mount
from . import MAX_TEXT_LENGTH

__all__ = [
    "WEB_DIR",
    "DemoSetupError",
    "add_arguments",
    "find_assets",
    "main",
    "run_from_args",
    "run_web_demo",
]

#: The page's static files (index.html, loader.js, style.css).
WEB_DIR = Path(__file__).resolve().parent / "web"
#: The repository root when running from a source checkout (src/grpcbridge/demo/web.py).
_REPO_ROOT = Path(__file__).resolve().parents[3]
GRPC_PATH = "/grpc"
CONFIG_PREFIX = "/_demo/"
#: The page, its loader and the wheels change with the sources: always revalidate (ETag).
NO_CACHE = "no-cache"
#: The Pyodide runtime (13 MiB) is the bulk of a page load: cache it. Its URL carries the
#: Pyodide version when it is known (see :func:`_static_mounts`): a new version is a new URL.
RUNTIME_CACHE = "public, max-age=31536000, immutable"
UNVERSIONED_RUNTIME_CACHE = "public, max-age=86400"


class DemoSetupError(ConfigError):
    """A file the browser demo needs is missing; the message says how to make it."""


def _check_pyodide_dir(path: Path) -> Path:
    if not (path / "pyodide.mjs").is_file() or not (path / "pyodide.asm.wasm").is_file():
        raise DemoSetupError(
            f"{path} is not a Pyodide distribution (no pyodide.mjs / pyodide.asm.wasm): run "
            "`npm ci` and `python scripts/build_browser_bundle.py` (or `make demo`), or pass "
            "the directory of a Pyodide release")
    return path


def _check_wheels_dir(path: Path) -> Path:
    manifest = path / "manifest.json"
    try:
        wheels = json.loads(manifest.read_text())["wheels"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DemoSetupError(
            f"{manifest} is missing or unreadable: run `python scripts/build_browser_bundle.py` "
            "(or `make demo`) in the repository root") from None
    missing = [name for name in wheels if not (path / name).is_file()]
    if missing:
        raise DemoSetupError(
            f"{path} lacks wheels its manifest lists ({', '.join(missing)}): run "
            "`python scripts/build_browser_bundle.py --force`")
    return path


def _search(relative: str, marker: str, missing: str, fix: str) -> Path:
    """The first of ``relative`` under the current directory and under the source checkout
    that holds ``marker``, else :class:`DemoSetupError`."""
    places = list(dict.fromkeys((base / relative).resolve() for base in (Path.cwd(), _REPO_ROOT)))
    found = next((path for path in places if (path / marker).is_file()), None)
    if found is None:
        looked = ", ".join(str(path) for path in places)
        raise DemoSetupError(f"{missing} (looked in {looked}): {fix}")
    return found


def find_assets(pyodide_dir: str | os.PathLike[str] | None = None,
                wheels_dir: str | os.PathLike[str] | None = None,
                pyodide_url: str | None = None) -> tuple[Path | str, Path]:
    """Resolve the demo's directories: the given ones, else ``node_modules/pyodide`` and
    ``build/browser`` under the current directory or the source checkout. Returns the Pyodide
    runtime (its directory, or the base URL to load it from) and the wheels' directory.
    Raises :class:`DemoSetupError` saying what to run when something is missing."""
    runtime: Path | str
    if pyodide_url is not None:
        parts = urlsplit(pyodide_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DemoSetupError(f"pyodide_url must be an http(s) URL, got {pyodide_url!r}")
        if pyodide_dir is not None:
            raise DemoSetupError("give pyodide_dir or pyodide_url, not both")
        runtime = pyodide_url.rstrip("/") + "/"
    elif pyodide_dir is not None:
        runtime = _check_pyodide_dir(Path(pyodide_dir).resolve())
    else:
        runtime = _check_pyodide_dir(_search(
            "node_modules/pyodide", "pyodide.mjs", "Pyodide not found",
            "run `npm ci` in the repository root (or `make demo`), or pass a Pyodide "
            "directory or a Pyodide CDN URL"))
    wheels = _check_wheels_dir(
        Path(wheels_dir).resolve() if wheels_dir is not None else _search(
            "build/browser", "manifest.json", "the browser wheels were not found",
            "run `python scripts/build_browser_bundle.py` (or `make demo`) in the "
            "repository root"))
    if not (WEB_DIR / "index.html").is_file():  # pragma: no cover - broken install
        raise DemoSetupError(f"{WEB_DIR} has no index.html: grpcbridge was installed without "
                             "its demo page (package data)")
    return runtime, wheels


def _pyodide_version(directory: Path) -> str | None:
    try:
        version = json.loads((directory / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        try:
            version = json.loads((directory / "pyodide-lock.json").read_text())["info"][
                "version"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    text = str(version)
    return text if text and all(c.isalnum() or c in ".-+" for c in text) else None


def _static_mounts(runtime: Path | str, wheels_dir: Path,
                   config_dir: Path) -> tuple[dict[str, Mount], str]:
    """The bridge's static mounts and the URL the page loads Pyodide from (see
    :func:`find_assets` for ``runtime``)."""
    mounts = [Mount("/", WEB_DIR, NO_CACHE), Mount(CONFIG_PREFIX, config_dir, "no-store"),
              Mount("/wheels/", wheels_dir, NO_CACHE)]
    url = runtime if isinstance(runtime, str) else "/pyodide/"
    if isinstance(runtime, Path):
        # /pyodide/ always works; /pyodide/<version>/ is what the page uses, cached for good.
        mounts.append(Mount(url, runtime, UNVERSIONED_RUNTIME_CACHE))
        version = _pyodide_version(runtime)
        if version is not None:
            url = f"/pyodide/{version}/"
            mounts.append(Mount(url, runtime, RUNTIME_CACHE))
    return {mount.prefix: mount for mount in mounts}, url


async def run_web_demo(*, listen: str = "127.0.0.1:8080",
                       db: str | os.PathLike[str] = "todo.sqlite3",
                       pyodide_dir: str | os.PathLike[str] | None = None,
                       pyodide_url: str | None = None,
                       wheels_dir: str | os.PathLike[str] | None = None,
                       max_text_length: int | None = MAX_TEXT_LENGTH) -> None:
    """Serve the browser demo until cancelled.

    ``listen``: ``host:port`` (port 0 picks a free one). ``db``: the SQLite file of the todos
    (created if needed), or ``":memory:"`` to keep them in memory. ``pyodide_dir`` / ``wheels_dir``:
    default to ``node_modules/pyodide`` and ``build/browser`` (see :func:`find_assets`);
    ``pyodide_url``: load Pyodide from this base URL (a CDN) instead of serving it.
    ``max_text_length``: the longest todo text the service accepts (None: no limit).
    The page URL is printed once the server listens. On cancellation the bridge closes its
    tunnels (code 1001, after a second: the page's sync stream never ends by itself) and
    the store is closed.
    """
    # Imported here, so that `grpcbridge --help` (which imports add_arguments) stays quick.
    from ..backends import GrpclibBackend
    from ..core.config import BridgeConfig
    from ..observability import log_event
    from ..server.bridge import Bridge
    from .grpclib_service import TodoService
    from .store import TodoStore

    runtime, wheels = find_assets(pyodide_dir, wheels_dir, pyodide_url)
    try:
        store = TodoStore(os.fspath(db), max_text_length=max_text_length)
    except sqlite3.Error as exc:
        raise DemoSetupError(f"cannot open the SQLite database {db!r}: {exc}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="grpcbridge-demo-") as config_dir:
            mounts, runtime_url = _static_mounts(runtime, wheels, Path(config_dir))
            page_config = {
                "pyodideUrl": runtime_url,
                "wheelsUrl": "/wheels/",
                "manifest": "manifest.json",
                "grpcPath": GRPC_PATH,
            }
            (Path(config_dir) / "config.json").write_text(json.dumps(page_config) + "\n")
            config = BridgeConfig(
                backend=GrpclibBackend([TodoService(store)]), listen=listen, path=GRPC_PATH,
                static=mounts, drain_timeout=1.0)
            async with Bridge(config) as bridge:
                assert bridge.address is not None
                host, port = bridge.address
                if host in ("0.0.0.0", "::"):
                    host = "127.0.0.1"  # a wildcard address: open the page on this machine
                url = f"http://{host_port(host, port)}/"
                log_event("web_demo_started", page=url, tunnel=bridge.url,
                          storage="memory" if db == ":memory:" else os.fspath(db))
                print(f"grpcbridge browser demo: open {url}  (Ctrl+C stops it)", flush=True)
                await bridge.serve_forever()
    finally:
        store.close()


# ------------------------------------------------------------------ command line


def _text_limit(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, got {number}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m grpcbridge.demo.web`` (and of ``grpcbridge demo``)."""
    parser.add_argument("--listen", default="127.0.0.1:8080",
                        help="host:port to serve the page and the tunnel on (default: "
                             "127.0.0.1:8080; port 0 picks a free one)")
    parser.add_argument("--db", default="todo.sqlite3", metavar="PATH",
                        help="SQLite file holding the todos (default: todo.sqlite3); "
                             "':memory:' keeps them in memory")
    parser.add_argument("--pyodide-dir", metavar="DIR",
                        help="Pyodide distribution to serve (default: node_modules/pyodide)")
    parser.add_argument("--pyodide-url", metavar="URL",
                        help="load Pyodide from this base URL (a CDN) instead of serving it")
    parser.add_argument("--wheels-dir", metavar="DIR",
                        help="wheels for the page (default: build/browser, made by "
                             "scripts/build_browser_bundle.py)")
    parser.add_argument("--max-text-length", type=_text_limit, default=MAX_TEXT_LENGTH,
                        metavar="N",
                        help="refuse todos longer than N characters (default: "
                             f"{MAX_TEXT_LENGTH}; 0: no limit, e.g. for benchmarks)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="default: info for `grpcbridge demo`, warning with --terminal "
                             "and for `python -m grpcbridge.demo.web`")


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, task.cancel)
    try:
        await run_web_demo(listen=args.listen, db=args.db,
                           pyodide_dir=args.pyodide_dir, pyodide_url=args.pyodide_url,
                           wheels_dir=args.wheels_dir,
                           max_text_length=args.max_text_length or None)
    except asyncio.CancelledError:
        pass  # SIGINT/SIGTERM: run_web_demo closed the bridge and the store
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo with parsed :func:`add_arguments` options; the exit status."""
    try:
        run(_serve_until_signalled(args))  # uvloop when installed (grpcbridge.loops)
    except (ConfigError, OSError) as exc:
        print(f"grpcbridge demo: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grpcbridge.demo.web``."""
    from ..observability import configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m grpcbridge.demo.web",
        description="Serve the browser Todo demo: Python in the page (Pyodide) calling gRPC "
                    "over WebSocket.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(level=getattr(logging, (args.log_level or "warning").upper()))
    with contextlib.suppress(KeyboardInterrupt):
        return run_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
