"""Static files served by the bridge next to its tunnel endpoint (the browser demo's page,
the Pyodide runtime and the wheels it installs), with no CDN and no other web server.

Each mount maps a URL prefix to a directory. Responses carry an ``ETag`` (revalidation
answers 304) and ``Cache-Control``; paths are resolved inside the mount's directory only.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_TYPES = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".whl": "application/zip",
    ".zip": "application/zip",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".py": "text/x-python; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True, slots=True)
class Mount:
    prefix: str
    directory: Path
    #: ``Cache-Control`` value for files of this mount.
    cache_control: str = "no-cache"


class StaticSite:
    """Serves files from ``mounts`` (URL prefix -> directory, or a :class:`Mount`)."""

    def __init__(self, mounts: Mapping[str, str | os.PathLike[str] | Mount]) -> None:
        self._mounts: list[Mount] = []
        for prefix, target in mounts.items():  # checked by BridgeConfig
            mount = target if isinstance(target, Mount) else Mount(prefix, Path(target))
            self._mounts.append(Mount(prefix, Path(mount.directory).resolve(),
                                      mount.cache_control))
        # Longest prefix first, so /pyodide/ wins over /.
        self._mounts.sort(key=lambda m: len(m.prefix), reverse=True)

    def respond(self, url_path: str, if_none_match: str | None
                ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """The answer for ``url_path`` (status, headers, body), or None (outside every
        mount, missing, or escaping)."""
        mount = next((m for m in self._mounts if url_path.startswith(m.prefix)), None)
        if mount is None:
            return None
        relative = url_path[len(mount.prefix):] or "index.html"
        if relative.endswith("/"):
            relative += "index.html"
        if "\0" in relative or "\\" in relative:
            return None
        path = (mount.directory / relative).resolve()
        if not path.is_relative_to(mount.directory) or not path.is_file():
            return None
        stat = path.stat()
        etag = '"' + hashlib.sha1(
            f"{stat.st_mtime_ns}-{stat.st_size}".encode()).hexdigest()[:16] + '"'
        headers = [("ETag", etag), ("Cache-Control", mount.cache_control)]
        if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
            return 304, headers, b""
        content_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] \
            or "application/octet-stream"
        headers.append(("Content-Type", content_type))
        return 200, headers, path.read_bytes()
