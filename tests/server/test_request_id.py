"""X-Request-Id: taken from the upgrade request when a trusted proxy sent it and it is well
formed (a malformed one is replaced, once logged; a direct client's is replaced and logged
once as ``client_request_id``), echoed in the 101 and in refusals, and carried by every log
line of the tunnel, on both engines of the standalone bridge, under BridgeApp and in a
``grpcbridge serve`` subprocess's JSON log. Bridges that should believe the test's header
trust 127.0.0.1 as a proxy, as a bridge behind nginx does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any

import pytest
import websockets.asyncio.client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from grpcbridge import Bridge, BridgeApp, BridgeConfig, Rejection
from grpcbridge.observability import MAX_REQUEST_ID

from support import BEHIND_PROXY, RawBackend, asgi_upgrade, cli, eventually, free_port, timing

#: Events about the bridge as a whole, not about one request.
BRIDGE_EVENTS = {"bridge_started", "bridge_stopped", "bridge_draining"}
GENERATED = re.compile(r"[0-9a-f]{32}")


def lines(records: list[logging.LogRecord]) -> list[tuple[str, dict[str, Any]]]:
    """``(event or message, fields)`` of every record except the bridge-wide events."""
    found = [(getattr(r, "event", None) or r.getMessage(), dict(getattr(r, "fields", {})))
             for r in records]
    return [(event, fields) for event, fields in found if event not in BRIDGE_EVENTS]


def request_ids(records: list[logging.LogRecord]) -> dict[str, set[str]]:
    """The request ids seen, with the events each appeared in; every line must have one."""
    seen: dict[str, set[str]] = {}
    for event, fields in lines(records):
        assert fields.get("request_id"), f"{event} has no request_id: {fields}"
        seen.setdefault(fields["request_id"], set()).add(event)
    return seen


def connect(url: str, **kwargs: Any) -> websockets.asyncio.client.connect:
    return websockets.asyncio.client.connect(url, open_timeout=timing(5),
                                             close_timeout=timing(2), ping_interval=None,
                                             **kwargs)


async def one_tunnel(url: str, headers: Any, backend: RawBackend, **kwargs: Any) -> str:
    """Open a tunnel with ``headers``, relay a byte each way, close; the echoed id."""
    accepted = backend.accepted
    async with connect(url, additional_headers=headers, **kwargs) as ws:
        echoed = ws.response.headers["X-Request-Id"]
        await ws.send(b"x")
        await eventually(lambda: backend.accepted > accepted)
        backend.writers[-1].write(b"y")
        async with asyncio.timeout(timing(5)):
            assert await ws.recv() == b"y"
    return str(echoed)


def tunnel_closed(records: list[logging.LogRecord], count: int) -> bool:
    return sum(getattr(r, "event", None) == "tunnel_closed" for r in records) >= count


TUNNEL_EVENTS = {"upgrade_accepted", "tunnel_opened", "tunnel_closed"}


@pytest.mark.parametrize("compression", [False, True], ids=["picows", "websockets"])
async def test_every_line_of_a_tunnel_carries_its_request_id(
        backend: RawBackend, grpcbridge_records: list[logging.LogRecord], compression: bool,
        leak_check: None) -> None:
    config = BridgeConfig(backend=f"127.0.0.1:{backend.port}", listen="127.0.0.1:0",
                          drain_timeout=0, compression=compression, **BEHIND_PROXY)
    deflate = "deflate" if compression else None
    async with Bridge(config) as bridge:
        given = await one_tunnel(bridge.url, {"X-Request-Id": "client-id_1.2:3"}, backend,
                                 compression=deflate)
        generated = await one_tunnel(bridge.url, {}, backend, compression=deflate)
        await eventually(lambda: tunnel_closed(grpcbridge_records, 2))
    assert given == "client-id_1.2:3"
    assert GENERATED.fullmatch(generated)
    assert request_ids(grpcbridge_records) == {given: TUNNEL_EVENTS, generated: TUNNEL_EVENTS}
    # A proxy's id is the request id: not logged a second time.
    assert not [fields for _event, fields in lines(grpcbridge_records)
                if "client_request_id" in fields]


@pytest.mark.parametrize("compression", [False, True], ids=["picows", "websockets"])
async def test_a_direct_clients_request_id_is_logged_once_not_used(
        backend: RawBackend, grpcbridge_records: list[logging.LogRecord], compression: bool,
        leak_check: None) -> None:
    # Not a trusted proxy: the client could name another tunnel's id to muddle the logs.
    config = BridgeConfig(backend=f"127.0.0.1:{backend.port}", listen="127.0.0.1:0",
                          drain_timeout=0, compression=compression,
                          trusted_proxies=["10.0.0.0/8"])
    deflate = "deflate" if compression else None
    async with Bridge(config) as bridge:
        first = await one_tunnel(bridge.url, {"X-Request-Id": "victim-1"}, backend,
                                 compression=deflate)
        second = await one_tunnel(bridge.url, {"X-Request-Id": "victim-1"}, backend,
                                  compression=deflate)
        await eventually(lambda: tunnel_closed(grpcbridge_records, 2))
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second
    assert request_ids(grpcbridge_records) == {first: TUNNEL_EVENTS, second: TUNNEL_EVENTS}
    logged = [(event, fields["request_id"]) for event, fields in lines(grpcbridge_records)
              if fields.get("client_request_id") == "victim-1"]
    assert logged == [("upgrade_accepted", first), ("upgrade_accepted", second)]


@pytest.mark.parametrize(("headers", "why"), [
    ([("X-Request-Id", "has spaces; and quotes\"")], "characters outside"),
    ([("X-Request-Id", "a" * (MAX_REQUEST_ID + 1))], f"over {MAX_REQUEST_ID} characters"),
    ([("X-Request-Id", "one"), ("X-Request-Id", "two")], "2 X-Request-Id headers"),
], ids=["characters", "oversized", "repeated"])
async def test_a_malformed_request_id_is_replaced_and_logged_once(
        backend: RawBackend, grpcbridge_records: list[logging.LogRecord], headers: Any,
        why: str, leak_check: None) -> None:
    config = BridgeConfig(backend=f"127.0.0.1:{backend.port}", listen="127.0.0.1:0",
                          drain_timeout=0)
    async with Bridge(config) as bridge:
        echoed = await one_tunnel(bridge.url, headers, backend)
        await eventually(lambda: tunnel_closed(grpcbridge_records, 1))
    assert GENERATED.fullmatch(echoed)
    assert request_ids(grpcbridge_records) == {echoed: TUNNEL_EVENTS | {"request_id_replaced"}}
    (replaced,) = [fields for event, fields in lines(grpcbridge_records)
                   if event == "request_id_replaced"]
    assert why in replaced["reason"]
    assert "quotes" not in json.dumps(replaced)  # the client's value is not logged
    assert len(json.dumps(replaced)) < 200


async def test_refusals_and_failures_carry_the_request_id(
        backend: RawBackend, grpcbridge_records: list[logging.LogRecord],
        leak_check: None) -> None:
    def failing_hook(request: object) -> Rejection | None:
        if "fail" in str(getattr(request, "query", "")):
            raise RuntimeError("hook bug")
        return None

    closed_port = free_port()
    config = BridgeConfig(backend=f"127.0.0.1:{closed_port}", listen="127.0.0.1:0",
                          drain_timeout=0, authenticate=failing_hook, **BEHIND_PROXY)
    async def refused(url: str, request_id: str) -> tuple[int, str]:
        with pytest.raises(InvalidStatus) as refusal:
            async with connect(url, additional_headers={"X-Request-Id": request_id}):
                pass
        response = refusal.value.response
        return response.status_code, response.headers["X-Request-Id"]

    async with Bridge(config) as bridge:
        assert await refused(bridge.url + "/elsewhere", "refused-1") == (404, "refused-1")
        assert await refused(bridge.url + "?fail=1", "hook-2") == (500, "hook-2")
        async with connect(bridge.url, additional_headers={"X-Request-Id": "dial-3"}) as ws:
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(timing(5)):
                    await ws.recv()
            assert ws.close_code == 1011
        await eventually(lambda: tunnel_closed(grpcbridge_records, 1))
    assert request_ids(grpcbridge_records) == {
        "refused-1": {"upgrade_rejected"},
        "hook-2": {"authentication hook failed", "upgrade_rejected"},
        "dial-3": {"upgrade_accepted", "backend_dial_failed", "tunnel_closed"},
    }


async def test_bridge_app_echoes_and_logs_the_request_id(
        grpcbridge_records: list[logging.LogRecord]) -> None:
    # asgi_upgrade's client is 192.0.2.1, here a trusted proxy.
    app = BridgeApp(BridgeConfig(backend="127.0.0.1:1", allowed_origins=[],
                                 trusted_proxies=["192.0.2.0/24"]))
    sent = await asgi_upgrade(app, path="/nowhere", headers=[
        (b"host", b"bridge.test"), (b"x-request-id", b"asgi-refused")])
    start = sent[0]
    assert start["type"] == "websocket.http.response.start" and start["status"] == 404
    assert (b"x-request-id", b"asgi-refused") in list(start["headers"])  # type: ignore[call-overload]
    bad = await asgi_upgrade(app, path="/nowhere", headers=[
        (b"host", b"bridge.test"), (b"x-request-id", b"\xff" * 3)])
    echoed = dict(bad[0]["headers"])[b"x-request-id"].decode()  # type: ignore[call-overload]
    assert GENERATED.fullmatch(echoed)
    await app.close()
    assert request_ids(grpcbridge_records) == {"asgi-refused": {"upgrade_rejected"},
                                   echoed: {"request_id_replaced", "upgrade_rejected"}}


async def test_json_log_of_serve_has_the_request_id_on_every_tunnel_line(
        backend: RawBackend, leak_check: None) -> None:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.port}",
              "--log-json", "--trusted-proxy", "127.0.0.1/32"]) as bridge:
        echoed = await one_tunnel(bridge.url, {"X-Request-Id": "json-9"}, backend)
        await eventually(lambda: any('"tunnel_closed"' in line for line in list(bridge.lines)))
    documents = [json.loads(line) for line in bridge.lines]
    # Lines without an event are the process's own ("received SIGTERM, shutting down").
    assert all("shutting down" in doc["message"] for doc in documents if "event" not in doc)
    per_tunnel = [doc for doc in documents
                  if "event" in doc and doc["event"] not in BRIDGE_EVENTS]
    assert echoed == "json-9"
    assert {doc["event"] for doc in per_tunnel} == TUNNEL_EVENTS
    assert all(doc["request_id"] == "json-9" for doc in per_tunnel), per_tunnel
