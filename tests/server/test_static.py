"""Static files served beside the tunnel endpoint (the browser demo's page and runtime)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpcbridge import Bridge, BridgeConfig, ConfigError

from support import http_get


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text("<h1>todo</h1>")
    (tmp_path / "app.wasm").write_bytes(b"\0asm" + bytes(1000))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.js").write_text("export {}")
    return tmp_path


async def test_files_types_etags_and_404s(site: Path, tmp_path_factory: pytest.TempPathFactory
                                          ) -> None:
    secret = tmp_path_factory.mktemp("outside") / "secret.txt"
    secret.write_text("do not serve")
    config = BridgeConfig(backend="127.0.0.1:1", listen="127.0.0.1:0", static={"/": site})
    async with Bridge(config) as bridge:
        assert bridge.address is not None
        port = bridge.address[1]
        status, headers, body = await http_get(port, "/")
        assert (status, body) == (200, b"<h1>todo</h1>")
        assert headers["content-type"].startswith("text/html")
        status, headers, body = await http_get(port, "/app.wasm")
        assert status == 200 and headers["content-type"] == "application/wasm"
        assert int(headers["content-length"]) == len(body) == 1004
        status, revalidated, body = await http_get(port, "/app.wasm",
                                             {"If-None-Match": headers["etag"]})
        assert (status, body) == (304, b"")
        assert revalidated["etag"] == headers["etag"]
        assert (await http_get(port, "/sub/x.js"))[1]["content-type"] == "text/javascript"
        for escape in ("/../" + secret.parent.name + "/secret.txt", "/%2e%2e/secret.txt",
                       "/missing.html"):
            status, _, body = await http_get(port, escape)
            assert status == 404 and b"do not serve" not in body
        # The tunnel path is never shadowed by the static site.
        assert (await http_get(port, "/grpc"))[0] == 426


def test_static_config_is_validated(site: Path) -> None:
    with pytest.raises(ConfigError, match="static"):
        BridgeConfig(backend="127.0.0.1:1", static={"/": site / "nope"})
    with pytest.raises(ConfigError, match="must start and end"):
        BridgeConfig(backend="127.0.0.1:1", static={"/app": site})
    with pytest.raises(ConfigError, match="hide the tunnel"):
        BridgeConfig(backend="127.0.0.1:1", static={"/grpc/": site})
