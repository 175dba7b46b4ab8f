"""The admission gate of the asyncio bridge (``grpcbridge.server.gate``) and the ASGI app's
rejection responses, checked without sockets (issue 8, hostile clients)."""

from __future__ import annotations

from typing import Any

import pytest

from grpcbridge.core.admission import BearerTokenAuth, Rejection
from grpcbridge.core.config import BridgeConfig
from grpcbridge.observability import BridgeMetrics
from grpcbridge.server.asgi import BridgeApp
from grpcbridge.server.gate import Admitted, Gate

from support import asgi_upgrade

TOKEN = "s3cret-Tok3n"


def gate(**settings: Any) -> Gate:
    return Gate(BridgeConfig(backend="127.0.0.1:1", **settings), BridgeMetrics())


async def check(g: Gate, path: str = "/grpc", **headers: str | list[str]) -> Admitted | Rejection:
    values = {name.replace("_", "-"): [value] if isinstance(value, str) else value
              for name, value in headers.items()}
    return await g.check(request_id="test", path=path, query="", headers=values,
                         peer="192.0.2.1", websocket=True, now=0.0)


class TestGate:
    async def test_allowed_hosts_refuse_dns_rebinding_before_the_origin_rule(self) -> None:
        g = gate(allowed_hosts=["bridge.example.com"])
        rebound = await check(g, host="evil.example", origin="http://evil.example")
        assert rebound == Rejection(403, "host not allowed", label="host")
        assert isinstance(await check(g, host="bridge.example.com:8080"), Admitted)
        assert isinstance(await check(g), Rejection)  # no Host header
        two = await check(g, host=["bridge.example.com", "evil.example"])
        assert isinstance(two, Rejection) and two.label == "host"

    async def test_without_allowed_hosts_today_s_same_host_rule_applies(self) -> None:
        g = gate()
        assert isinstance(await check(g, host="evil.example", origin="http://evil.example"),
                          Admitted)
        refused = await check(g, host="bridge.example.com", origin="http://evil.example")
        assert isinstance(refused, Rejection) and refused.label == "origin"

    async def test_hostile_origin_is_a_403_not_an_exception(self) -> None:
        refused = await check(gate(), host="bridge.test", origin="http://[abc")
        assert isinstance(refused, Rejection) and refused.status == 403

    async def test_path_parameters_never_reach_the_reason_or_the_log(
            self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level("INFO", logger="grpcbridge")
        refused = await check(gate(), "/grpc;access_token=s3cret\n", host="bridge.test")
        assert isinstance(refused, Rejection) and refused.status == 404
        assert refused.reason == "no tunnel endpoint at /grpc; use /grpc"
        logged = [getattr(record, "fields", {}) for record in caplog.records]
        assert logged and all("s3cret" not in str(fields) for fields in logged)
        assert logged[-1]["path"] == "/grpc"


async def test_asgi_rejection_carries_www_authenticate() -> None:
    app = BridgeApp(BridgeConfig(backend="127.0.0.1:1", authenticate=BearerTokenAuth(TOKEN)))
    sent = await asgi_upgrade(app)
    start = sent[0]
    assert start["type"] == "websocket.http.response.start" and start["status"] == 401
    assert (b"www-authenticate", b'Bearer realm="grpcbridge"') in start["headers"]
    await app.close()
