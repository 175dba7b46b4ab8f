"""Metrics and structured log events: one vocabulary for every adapter.

Log events go to the ``grpcbridge`` logger as records with an ``event`` name and ``fields``;
:func:`configure_logging` renders them one per line as ``key=value`` pairs or JSON.
Metrics live in a per-instance Prometheus registry so several bridges in one process (tests,
ASGI apps) never collide. Under ``grpcbridge serve --workers N`` each worker process records
into prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the
supervisor before the worker starts) and the supervisor serves their sum.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger("grpcbridge")

_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400, float("inf"))
_DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, float("inf"))


#: The header naming a request across systems (a proxy's, the bridge's logs, the client's).
REQUEST_ID_HEADER = "X-Request-Id"
#: Longest ``X-Request-Id`` taken from a client; longer ones are replaced.
MAX_REQUEST_ID = 128
#: What a client's ``X-Request-Id`` may contain (UUIDs, nginx's ``$request_id``, base64 and
#: ``key=value`` forms); nothing that could split a log line or a header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+/=-]+")


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def choose_request_id(values: Sequence[str]) -> tuple[str, str | None]:
    """The request id for an upgrade request whose ``X-Request-Id`` headers are ``values``:
    the client's when there is exactly one and it is well formed (at most
    :data:`MAX_REQUEST_ID` characters of ``A-Z a-z 0-9 . _ : @ + / = -``), else a new one.
    Returns ``(request_id, why the client's was replaced, or None)``."""
    if not values:
        return new_request_id(), None
    if len(values) > 1:
        return new_request_id(), f"{len(values)} {REQUEST_ID_HEADER} headers"
    value = values[0]
    if len(value) > MAX_REQUEST_ID:
        return new_request_id(), f"over {MAX_REQUEST_ID} characters ({len(value)})"
    if not _REQUEST_ID.fullmatch(value):
        return new_request_id(), ("empty" if not value else
                                  "characters outside A-Z a-z 0-9 . _ : @ + / = -")
    return value, None


def log_event(event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Emit one structured event (``tunnel_opened``, ``upgrade_rejected``...)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"event": event, "fields": fields})


class _EventFormatter(logging.Formatter):
    def __init__(self, as_json: bool, common: dict[str, Any]) -> None:
        super().__init__()
        self.as_json = as_json
        self.common = common

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, "fields", {}))
        fields.update(self.common)
        event = getattr(record, "event", None)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        if self.as_json:
            document: dict[str, Any] = {"time": stamp, "level": record.levelname.lower()}
            if event is not None:
                document["event"] = event
            else:
                document["message"] = record.getMessage()
            document.update(fields)
            if record.exc_info:
                document["exception"] = self.formatException(record.exc_info)
            return json.dumps(document, default=str, ensure_ascii=False)
        head = f"{stamp} {record.levelname.lower():<7} {event or record.getMessage()}"
        parts = [head] + [f"{key}={_logfmt(value)}" for key, value in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _logfmt(value: Any) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def configure_logging(*, json_lines: bool = False, level: int = logging.INFO,
                      common: dict[str, Any] | None = None) -> None:
    """Send grpcbridge's events to stderr, one per line (``key=value`` or JSON); ``common``
    fields (a worker's ``worker`` and ``pid``) end every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EventFormatter(json_lines, dict(common or {})))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


class BridgeMetrics:
    """The operator's view of a bridge (Prometheus)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # livesum: summed over the live workers in multiprocess mode (ignored otherwise).
        self.tunnels_active = Gauge(
            "grpcbridge_tunnels_active", "Tunnels currently open.", registry=r,
            multiprocess_mode="livesum")
        self.tunnels_closed = Counter(
            "grpcbridge_tunnels_closed", "Tunnels closed, by WebSocket close code.",
            ["code"], registry=r)
        self.tunnels_retired = Counter(
            "grpcbridge_tunnels_retired",
            "Tunnels sent a GOAWAY for reaching their maximum age.", registry=r)
        self.upgrades_accepted = Counter(
            "grpcbridge_upgrades_accepted", "WebSocket upgrades accepted.", registry=r)
        self.upgrades_rejected = Counter(
            "grpcbridge_upgrades_rejected", "Upgrade requests refused, by reason.",
            ["reason"], registry=r)
        self.bytes = Counter(
            "grpcbridge_bytes", "Stream bytes relayed, by direction.", ["direction"], registry=r)
        self.tunnel_duration = Histogram(
            "grpcbridge_tunnel_duration_seconds", "Lifetime of closed tunnels.",
            buckets=_DURATION_BUCKETS, registry=r)
        self.backend_dial_failures = Counter(
            "grpcbridge_backend_dial_failures", "Backend connections that failed, by reason.",
            ["reason"], registry=r)
        self.backend_dial_seconds = Histogram(
            "grpcbridge_backend_dial_seconds", "Time to connect to the backend.",
            buckets=_DIAL_BUCKETS, registry=r)
        self._to_backend = self.bytes.labels("client_to_backend")
        self._to_client = self.bytes.labels("backend_to_client")

    def add_bytes(self, to_backend: int, to_client: int) -> None:
        if to_backend:
            self._to_backend.inc(to_backend)
        if to_client:
            self._to_client.inc(to_client)
