"""Unit tests of the sans-I/O core (``grpcbridge.core``): no sockets, no event loop."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from grpcbridge.core.admission import (
    LOGGABLE_PATH_LIMIT,
    AbuseLimiter,
    BearerTokenAuth,
    HandshakeRequest,
    HostPolicy,
    OriginPolicy,
    Rejection,
    client_identity,
    loggable_path,
    parse_networks,
    select_subprotocol,
)
from grpcbridge.core.config import BridgeConfig, ForwarderConfig
from grpcbridge.core.errors import ConfigError, TargetError
from grpcbridge.core.stream import (
    CloseCode,
    fit_close_reason,
    message_too_big_reason,
)
from grpcbridge.core.target import (
    SocketAddress,
    browser_target,
    host_port,
    parse_address,
    parse_target,
)

# --------------------------------------------------------------------------- targets


class TestParseTarget:
    def test_full_url_keeps_path_query_and_port(self) -> None:
        t = parse_target("ws://bridge.example:8080/api/grpc?tenant=a&x=1")
        assert (t.secure, t.host, t.port, t.explicit_port) == (
            False, "bridge.example", 8080, True)
        assert t.resource == "/api/grpc?tenant=a&x=1"
        assert t.scheme == "ws"
        assert t.url == "ws://bridge.example:8080/api/grpc?tenant=a&x=1"

    def test_surrounding_whitespace_is_trimmed(self) -> None:
        t = parse_target("  \t ws://h:1/p \n")
        assert t.url == "ws://h:1/p"

    @pytest.mark.parametrize("raw", ["", "   ", "\t\n"])
    def test_empty_is_an_error(self, raw: str) -> None:
        with pytest.raises(TargetError, match="empty"):
            parse_target(raw)

    @pytest.mark.parametrize("raw", ["http://h/grpc", "https://h/grpc", "ftp://h", "tcp://h:1"])
    def test_other_schemes_are_errors(self, raw: str) -> None:
        with pytest.raises(TargetError, match=r"use ws:// or wss://"):
            parse_target(raw)

    def test_target_error_is_a_config_error(self) -> None:
        with pytest.raises(ConfigError):
            parse_target("http://h")

    def test_bare_port_means_localhost(self) -> None:
        t = parse_target(":8080")
        assert (t.host, t.port, t.secure, t.explicit_port) == ("localhost", 8080, False, True)
        assert t.url == "ws://localhost:8080/"

    def test_bare_port_with_tls_is_wss_localhost(self) -> None:
        t = parse_target(":8443/grpc", tls=True)
        assert t.url == "wss://localhost:8443/grpc"

    def test_no_scheme_means_ws(self) -> None:
        t = parse_target("bridge.example:8080/grpc")
        assert t.secure is False
        assert t.url == "ws://bridge.example:8080/grpc"

    def test_no_scheme_with_tls_means_wss(self) -> None:
        t = parse_target("bridge.example/grpc", tls=True)
        assert t.secure is True
        assert t.port == 443 and not t.explicit_port
        assert t.url == "wss://bridge.example/grpc"

    def test_no_scheme_with_tls_false_means_ws(self) -> None:
        assert parse_target("h:1", tls=False).url == "ws://h:1/"

    def test_explicit_ws_with_tls_requested_is_refused_not_downgraded(self) -> None:
        with pytest.raises(TargetError, match="never downgrades"):
            parse_target("ws://bridge.example:8080/grpc", tls=True)

    def test_explicit_wss_with_tls_disabled_is_refused(self) -> None:
        with pytest.raises(TargetError, match="TLS was disabled"):
            parse_target("wss://bridge.example/grpc", tls=False)

    def test_scheme_follows_url_when_tls_unspecified(self) -> None:
        assert parse_target("wss://h/x").secure is True
        assert parse_target("WSS://H/x").secure is True
        assert parse_target("ws://h/x").secure is False

    def test_default_ports_are_not_added_to_the_authority(self) -> None:
        assert parse_target("ws://h/grpc").port == 80
        assert parse_target("wss://h/grpc").port == 443
        assert parse_target("wss://h/grpc").authority == "h"
        # An explicit default port stays explicit (kept as written).
        assert parse_target("wss://h:443/grpc").authority == "h:443"

    def test_empty_path_becomes_slash_and_query_alone_is_kept(self) -> None:
        assert parse_target("ws://h:1").resource == "/"
        assert parse_target("ws://h:1?a=b").resource == "/?a=b"

    def test_authority_is_host_and_port_never_the_path(self) -> None:
        t = parse_target("wss://bridge.example:9443/deep/path?q=1")
        assert t.authority == "bridge.example:9443"
        assert "/" not in t.authority

    def test_ipv6_literal(self) -> None:
        t = parse_target("ws://[::1]:8080/grpc")
        assert t.host == "::1"
        assert t.port == 8080
        assert t.authority == "[::1]:8080"
        assert t.url == "ws://[::1]:8080/grpc"
        t = parse_target("wss://[2001:db8::5]/grpc")
        assert t.authority == "[2001:db8::5]"
        assert str(t) == "wss://[2001:db8::5]/grpc"

    def test_ipv6_without_scheme(self) -> None:
        assert parse_target("[::1]:9000").authority == "[::1]:9000"

    @pytest.mark.parametrize("raw", ["ws://:8080/grpc", "ws:///grpc", "wss://"])
    def test_missing_host_is_an_error(self, raw: str) -> None:
        with pytest.raises(TargetError, match="no host"):
            parse_target(raw)

    def test_invalid_port_is_an_error(self) -> None:
        with pytest.raises(TargetError, match="invalid port"):
            parse_target("ws://h:99999/grpc")
        with pytest.raises(TargetError, match="invalid port"):
            parse_target("ws://h:abc/grpc")

    def test_credentials_in_url_are_refused(self) -> None:
        with pytest.raises(TargetError, match="credentials"):
            parse_target("ws://user:secret@h:1/grpc")


class TestBrowserTarget:
    def test_empty_uses_page_host_and_ws_for_http(self) -> None:
        t = browser_target("", page_protocol="http:", page_host="app.example:8080")
        assert t.url == "ws://app.example:8080/"

    def test_path_uses_page_host_and_wss_for_https(self) -> None:
        t = browser_target("/grpc", page_protocol="https:", page_host="app.example")
        assert t.url == "wss://app.example/grpc"
        assert t.secure

    def test_protocol_without_colon_and_case(self) -> None:
        t = browser_target("/grpc", page_protocol="HTTPS", page_host="app.example")
        assert t.secure

    def test_full_url_is_taken_as_given(self) -> None:
        t = browser_target("ws://other.example:1/x", page_protocol="https:",
                           page_host="app.example")
        assert t.url == "ws://other.example:1/x"

    def test_whitespace_only_means_page_host(self) -> None:
        t = browser_target("  ", page_protocol="https:", page_host="[::1]:8443")
        assert t.url == "wss://[::1]:8443/"


class TestParseAddress:
    def test_host_port(self) -> None:
        a = parse_address("127.0.0.1:50051")
        assert a == SocketAddress(host="127.0.0.1", port=50051)
        assert not a.is_unix
        assert str(a) == "127.0.0.1:50051"

    def test_hostname_and_whitespace(self) -> None:
        assert parse_address("  localhost:80 ") == SocketAddress(host="localhost", port=80)

    def test_bracketed_ipv6(self) -> None:
        a = parse_address("[::1]:50051")
        assert (a.host, a.port) == ("::1", 50051)
        assert str(a) == "[::1]:50051"

    def test_unix_path(self) -> None:
        a = parse_address("unix:/run/app/grpc.sock")
        assert a.is_unix
        assert a.path == "/run/app/grpc.sock"
        assert a.host is None and a.port is None
        assert str(a) == "unix:/run/app/grpc.sock"

    def test_host_port_brackets_ipv6_only(self) -> None:
        assert host_port("example.com", 80) == "example.com:80"
        assert host_port("10.0.0.1", 0) == "10.0.0.1:0"
        assert host_port("::1", 443) == "[::1]:443"
        assert host_port("fe80::1%eth0") == "[fe80::1%eth0]"
        assert host_port("example.com") == "example.com"

    def test_unix_url_form(self) -> None:
        assert parse_address("unix:///tmp/x.sock").path == "/tmp/x.sock"

    def test_empty_unix_path(self) -> None:
        with pytest.raises(TargetError, match="empty unix socket path"):
            parse_address("unix:")

    @pytest.mark.parametrize("raw", ["nonsense", "", ":8080", "127.0.0.1"])
    def test_not_host_port(self, raw: str) -> None:
        with pytest.raises(TargetError, match="not host:port or unix:/path"):
            parse_address(raw)

    def test_non_numeric_port(self) -> None:
        with pytest.raises(TargetError, match="non-numeric port"):
            parse_address("h:http")

    @pytest.mark.parametrize("port", [0, 65536, -1])
    def test_port_out_of_range(self, port: int) -> None:
        with pytest.raises(TargetError, match="outside 1-65535"):
            parse_address(f"h:{port}")

    def test_port_zero_when_allowed(self) -> None:
        assert parse_address("127.0.0.1:0", allow_port_zero=True).port == 0
        with pytest.raises(TargetError, match="outside"):
            parse_address("127.0.0.1:65536", allow_port_zero=True)

    def test_error_names_what(self) -> None:
        with pytest.raises(TargetError, match=r"^backend 'x' "):
            parse_address("x", what="backend")


class TestIsLoopback:
    @pytest.mark.parametrize("raw", ["127.0.0.1:1", "127.9.8.7:1", "localhost:1",
                                     "LocalHost:1", "[::1]:1", "unix:/tmp/s"])
    def test_loopback(self, raw: str) -> None:
        assert parse_address(raw).is_loopback()

    @pytest.mark.parametrize("raw", ["0.0.0.0:1", "10.0.0.1:1", "192.168.1.1:1",
                                     "example.com:1", "[::]:1", "[2001:db8::1]:1",
                                     "localhost.evil.com:1"])
    def test_not_loopback(self, raw: str) -> None:
        assert not parse_address(raw).is_loopback()


# ----------------------------------------------------------------------- admission


def request(
    headers: Mapping[str, Sequence[str]] | None = None,
    *,
    query: str = "",
    subprotocols: tuple[str, ...] = (),
) -> HandshakeRequest:
    return HandshakeRequest(path="/grpc", query=query, headers=dict(headers or {}),
                            client="203.0.113.5", subprotocols=subprotocols)


class TestHandshakeRequest:
    def test_header_is_case_insensitive_and_first_value(self) -> None:
        r = request({"x-a": ["1", "2"]})
        assert r.header("X-A") == "1"
        assert r.header("x-missing") is None

    def test_query_values(self) -> None:
        r = request(query="a=1&a=2&b=")
        assert r.query_values("a") == ["1", "2"]
        assert r.query_values("b") == [""]
        assert r.query_values("c") == []


class TestOriginPolicy:
    def test_no_origin_passes(self) -> None:
        assert OriginPolicy().allows(None, "bridge.example:8080")
        assert OriginPolicy().allows(None, None)

    def test_default_same_host_passes(self) -> None:
        policy = OriginPolicy()
        assert policy.allows("http://bridge.example:8080", "bridge.example:8080")
        assert policy.allows("https://bridge.example", "bridge.example")
        assert policy.allows("HTTPS://Bridge.Example/", "bridge.example")

    def test_default_other_host_or_port_is_refused(self) -> None:
        policy = OriginPolicy()
        assert not policy.allows("https://evil.example", "bridge.example")
        assert not policy.allows("http://bridge.example:9090", "bridge.example:8080")
        assert not policy.allows("http://bridge.example:8080", "bridge.example")
        assert not policy.allows("https://bridge.example.evil.com", "bridge.example")
        assert not policy.allows("https://bridge.example", None)

    def test_null_and_garbage_origins_are_refused(self) -> None:
        policy = OriginPolicy()
        assert not policy.allows("null", "bridge.example")
        assert not policy.allows("", "bridge.example")

    def test_ipv6_same_host(self) -> None:
        assert OriginPolicy().allows("http://[::1]:8080", "[::1]:8080")
        assert not OriginPolicy().allows("http://[::1]:8081", "[::1]:8080")

    def test_full_origin_entry_matches_scheme_host_and_port_exactly(self) -> None:
        policy = OriginPolicy(["https://app.example.com/"])
        assert policy.allows("https://app.example.com", "bridge.example")
        assert policy.allows("HTTPS://APP.example.com", "bridge.example")
        assert not policy.allows("http://app.example.com", "bridge.example")
        assert not policy.allows("https://app.example.com:8443", "bridge.example")
        assert not policy.allows("https://other.example.com", "bridge.example")
        # Same-host requests still pass with an allow-list.
        assert policy.allows("https://bridge.example", "bridge.example")

    def test_bare_host_entry_matches_any_scheme_and_port(self) -> None:
        policy = OriginPolicy(["App.Example.com"])
        assert policy.allows("https://app.example.com", "bridge.example")
        assert policy.allows("http://app.example.com:3000", "bridge.example")
        assert not policy.allows("https://sub.app.example.com", "bridge.example")
        assert not policy.allows("https://app.example.com.evil", "bridge.example")

    def test_host_and_port_entry_matches_that_port_only(self) -> None:
        policy = OriginPolicy(["localhost:3000"])
        assert policy.allows("http://localhost:3000", "bridge.example")
        assert not policy.allows("http://localhost:3001", "bridge.example")

    def test_star_allows_anything(self) -> None:
        policy = OriginPolicy(["*"])
        assert policy.allows("https://anything.example", "bridge.example")
        assert policy.allows("null", "bridge.example")

    @pytest.mark.parametrize("entry", ["", "  ", "ftp://files.example", "https://:8080",
                                       "https://app.example/path", "app.example/x"])
    def test_bad_entries_are_config_errors(self, entry: str) -> None:
        with pytest.raises(ConfigError, match="origin"):
            OriginPolicy([entry])


class TestClientIdentity:
    PROXIES = parse_networks(["10.0.0.0/8", "fd00::/8"], what="trusted_proxies")

    def test_peer_when_no_trusted_proxies(self) -> None:
        assert client_identity("10.0.0.1", ["198.51.100.7"], ()) == "10.0.0.1"

    def test_forwarded_for_ignored_from_untrusted_peer(self) -> None:
        assert client_identity("192.0.2.1", ["198.51.100.7"], self.PROXIES) == "192.0.2.1"

    def test_forwarded_for_believed_from_trusted_proxy(self) -> None:
        assert client_identity("10.0.0.1", ["198.51.100.7"], self.PROXIES) == "198.51.100.7"

    def test_rightmost_untrusted_hop_wins_over_spoofed_left_entries(self) -> None:
        chain = ["1.1.1.1, 198.51.100.7, 10.0.0.2"]
        assert client_identity("10.0.0.1", chain, self.PROXIES) == "198.51.100.7"

    def test_multiple_header_values_are_one_chain(self) -> None:
        chain = ["1.1.1.1", "198.51.100.7", "10.0.0.3, 10.0.0.2"]
        assert client_identity("10.0.0.1", chain, self.PROXIES) == "198.51.100.7"

    def test_ipv6_hops(self) -> None:
        assert client_identity("fd00::1", ["2001:db8::9, fd00::2"], self.PROXIES) == "2001:db8::9"

    def test_malformed_chain_is_not_trusted(self) -> None:
        assert client_identity("10.0.0.1", ["not-an-ip, 10.0.0.2"], self.PROXIES) == "10.0.0.1"
        assert client_identity("10.0.0.1", ["198.51.100.7,"], self.PROXIES) == "10.0.0.1"
        assert client_identity("10.0.0.1", ["unknown"], self.PROXIES) == "10.0.0.1"

    def test_only_trusted_hops_or_no_header_gives_peer(self) -> None:
        assert client_identity("10.0.0.1", ["10.0.0.2, 10.0.0.3"], self.PROXIES) == "10.0.0.1"
        assert client_identity("10.0.0.1", [], self.PROXIES) == "10.0.0.1"

    def test_bad_network_is_config_error_naming_the_setting(self) -> None:
        with pytest.raises(ConfigError, match="trusted_proxies"):
            parse_networks(["10.0.0.0/33"], what="trusted_proxies")


TOKEN = "s3cret-Tok3n"


class TestBearerTokenAuth:
    auth = BearerTokenAuth(TOKEN)

    def test_authorization_header(self) -> None:
        assert self.auth(request({"authorization": [f"Bearer {TOKEN}"]})) is None
        assert self.auth(request({"authorization": [f"bearer  {TOKEN} "]})) is None

    def test_subprotocol_entry(self) -> None:
        assert self.auth(request(subprotocols=("grpcbridge", f"bearer.{TOKEN}"))) is None

    def test_query_parameter(self) -> None:
        assert self.auth(request(query=f"x=1&access_token={TOKEN}")) is None

    def test_missing_is_401(self) -> None:
        for r in (request(), request({"authorization": [f"Basic {TOKEN}"]}),
                  request(subprotocols=("grpcbridge",)), request(query="token=x")):
            rejection = self.auth(r)
            assert isinstance(rejection, Rejection)
            assert rejection.status == 401
            assert rejection.label == "auth"

    def test_wrong_is_403(self) -> None:
        for r in (request({"authorization": ["Bearer nope"]}),
                  request(subprotocols=("bearer.nope",)),
                  request(query="access_token=nope"),
                  request({"authorization": [f"Bearer {TOKEN}x"]}),
                  request(query=f"access_token={TOKEN[:-1]}")):
            rejection = self.auth(r)
            assert rejection is not None
            assert rejection.status == 403

    def test_any_matching_candidate_accepts(self) -> None:
        r = request({"authorization": ["Bearer wrong"]}, query=f"access_token={TOKEN}")
        assert self.auth(r) is None

    def test_token_never_in_repr_or_rejections(self) -> None:
        assert TOKEN not in repr(self.auth)
        assert TOKEN not in str(self.auth)
        assert "redacted" in repr(self.auth)
        rejection = self.auth(request(query=f"access_token={TOKEN}x"))
        assert rejection is not None
        assert TOKEN not in repr(rejection)

    @pytest.mark.parametrize("token", ["", " x", "x "])
    def test_bad_token_is_config_error(self, token: str) -> None:
        with pytest.raises(ConfigError, match="token"):
            BearerTokenAuth(token)


class TestSelectSubprotocol:
    def test_first_allowed_that_was_offered(self) -> None:
        assert select_subprotocol(["b", "a"], ["a", "b"]) == "a"
        assert select_subprotocol(["x", "grpcbridge"], ["grpcbridge"]) == "grpcbridge"

    def test_none_when_nothing_matches_or_offered(self) -> None:
        assert select_subprotocol([], ["grpcbridge"]) is None
        assert select_subprotocol(["other"], ["grpcbridge"]) is None
        assert select_subprotocol(["grpcbridge"], []) is None

    def test_bearer_entries_are_never_echoed(self) -> None:
        assert select_subprotocol([f"bearer.{TOKEN}"], [f"bearer.{TOKEN}"]) is None
        assert select_subprotocol([f"bearer.{TOKEN}", "grpcbridge"],
                                  [f"bearer.{TOKEN}", "grpcbridge"]) == "grpcbridge"


class TestAbuseLimiter:
    def test_disabled_limits_admit_everything(self) -> None:
        limiter = AbuseLimiter()
        for i in range(1000):
            assert limiter.admit("c", float(i)) is None
        assert limiter.active == 1000

    def test_global_cap_is_503(self) -> None:
        limiter = AbuseLimiter(max_connections=2)
        assert limiter.admit("a", 0) is None
        assert limiter.admit("b", 0) is None
        rejection = limiter.admit("c", 0)
        assert rejection is not None
        assert rejection.status == 503
        assert rejection.retry_after is not None and rejection.retry_after >= 1
        assert rejection.label == "capacity"
        limiter.release("a", 1)
        assert limiter.admit("c", 1) is None

    def test_per_client_cap_is_429(self) -> None:
        limiter = AbuseLimiter(max_connections_per_client=2)
        assert limiter.admit("a", 0) is None
        assert limiter.admit("a", 0) is None
        rejection = limiter.admit("a", 0)
        assert rejection is not None
        assert rejection.status == 429
        assert rejection.retry_after is not None
        assert limiter.admit("b", 0) is None  # other clients unaffected
        limiter.release("a", 1)
        assert limiter.admit("a", 1) is None

    def test_rejection_does_not_count_as_active(self) -> None:
        limiter = AbuseLimiter(max_connections=1)
        assert limiter.admit("a", 0) is None
        assert limiter.admit("b", 0) is not None
        assert limiter.active == 1
        limiter.release("a", 0)
        assert limiter.active == 0
        assert limiter.tracked_clients == 0
        with pytest.raises(RuntimeError):
            limiter.release("b", 0)  # b was refused, so it has nothing to release

    def test_sliding_window_and_retry_after_from_oldest_upgrade(self) -> None:
        limiter = AbuseLimiter(max_upgrades_per_minute=2)
        assert limiter.admit("a", 100.0) is None
        assert limiter.admit("a", 110.0) is None
        limiter.release("a", 111.0)
        limiter.release("a", 111.0)
        rejection = limiter.admit("a", 120.0)
        assert rejection is not None
        assert rejection.status == 429
        assert rejection.label == "rate"
        assert rejection.retry_after == 40  # oldest (100) + 60 - 120
        rejection = limiter.admit("a", 159.5)
        assert rejection is not None and rejection.retry_after == 1  # ceil(0.5)
        rejection = limiter.admit("a", 130.2)
        assert rejection is not None and rejection.retry_after == 30  # ceil(29.8)
        # Refusals do not extend the window: the oldest upgrade expires at 160.
        assert limiter.admit("a", 160.0) is None
        # Now the window holds 110 and 160: the next refusal counts from 110.
        rejection = limiter.admit("a", 161.0)
        assert rejection is not None and rejection.retry_after == 9
        assert limiter.admit("b", 161.0) is None  # per client

    def test_rate_limit_counts_upgrades_not_active_tunnels(self) -> None:
        limiter = AbuseLimiter(max_upgrades_per_minute=3)
        for t in (0.0, 1.0, 2.0):
            assert limiter.admit("a", t) is None
            limiter.release("a", t)
        assert limiter.admit("a", 3.0) is not None

    def test_state_pruned_on_release_after_window(self) -> None:
        limiter = AbuseLimiter(max_upgrades_per_minute=5, max_connections_per_client=5)
        for i in range(5000):
            assert limiter.admit(f"10.0.{i // 256}.{i % 256}", 0.0) is None
        assert limiter.tracked_clients == 5000
        for i in range(5000):
            limiter.release(f"10.0.{i // 256}.{i % 256}", 61.0)
        assert limiter.tracked_clients == 0
        assert limiter.active == 0

    def test_state_pruned_by_sweep_when_released_inside_window(self) -> None:
        limiter = AbuseLimiter(max_upgrades_per_minute=5)
        for i in range(5000):
            client = f"c{i}"
            assert limiter.admit(client, 1.0) is None
            limiter.release(client, 2.0)
        # Upgrades still inside the window: the state is needed for the rate limit.
        assert limiter.tracked_clients == 5000
        # Any later admission sweeps out everything that expired.
        assert limiter.admit("late", 200.0) is None
        assert limiter.tracked_clients == 1
        limiter.release("late", 261.0)
        assert limiter.tracked_clients == 0

    def test_state_dropped_at_once_without_rate_limit(self) -> None:
        limiter = AbuseLimiter(max_connections_per_client=3)
        for i in range(1000):
            assert limiter.admit(f"c{i}", 0.0) is None
            limiter.release(f"c{i}", 0.0)
        assert limiter.tracked_clients == 0

    def test_release_keeps_state_while_tunnels_remain(self) -> None:
        limiter = AbuseLimiter()
        limiter.admit("a", 0)
        limiter.admit("a", 0)
        limiter.release("a", 0)
        assert limiter.tracked_clients == 1
        limiter.release("a", 0)
        assert limiter.tracked_clients == 0

    def test_release_without_admit_raises(self) -> None:
        limiter = AbuseLimiter()
        with pytest.raises(RuntimeError, match="without a matching admit"):
            limiter.release("ghost", 0)
        limiter.admit("a", 0)
        limiter.release("a", 0)
        with pytest.raises(RuntimeError):
            limiter.release("a", 0)
        assert limiter.active == 0

    def test_negative_limits_are_config_errors(self) -> None:
        with pytest.raises(ConfigError, match="max_upgrades_per_minute"):
            BridgeConfig(backend="127.0.0.1:50051", max_upgrades_per_minute=-1)
        with pytest.raises(ConfigError, match="max_connections_per_client"):
            BridgeConfig(backend="127.0.0.1:50051", max_connections_per_client=-1)


# -------------------------------------------------------------------------- stream


class TestStreamRules:
    def test_close_codes(self) -> None:
        assert [int(c) for c in CloseCode] == [1000, 1001, 1002, 1003, 1006, 1008, 1009, 1011]

    def test_too_big_reason_fits_in_a_close_frame(self) -> None:
        reason = message_too_big_reason(16 * 1024 * 1024)
        assert "16777216" in reason
        assert len(reason.encode()) <= 123

    def test_close_reason_is_cut_to_fit_between_characters(self) -> None:
        assert fit_close_reason("short") == "short"
        exact = "x" * 123
        assert fit_close_reason(exact) == exact
        cut = fit_close_reason("x" * 119 + "é" * 10)  # a 2-byte character straddles byte 120
        assert cut == "x" * 119 + "..."
        assert len(fit_close_reason("€" * 100).encode()) <= 123
        assert fit_close_reason("€" * 100) == "€" * 40 + "..."


# -------------------------------------------------------------------------- config


def check_names(exc: pytest.ExceptionInfo[ConfigError], name: str) -> None:
    message = str(exc.value)
    assert re.search(name.replace("_", "[_ ]"), message), (name, message)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backend", "nonsense"),
        ("backend", "127.0.0.1:0"),
        ("listen", "nonsense"),
        ("listen", "unix:"),
        ("path", "grpc"),
        ("path", "/grpc?x=1"),
        ("backend_connect_timeout", 0),
        ("backend_connect_timeout", -1.0),
        ("handshake_timeout", 0),
        ("handshake_timeout", "10"),
        ("ping_interval", -1),
        ("ping_interval", True),
        ("idle_timeout", -0.5),
        ("drain_timeout", -1),
        ("max_message_bytes", 1023),
        ("buffer_bytes", 4095),
        ("max_connections", -1),
        ("max_connections_per_client", -1),
        ("max_upgrades_per_minute", -1),
        ("max_upgrades_per_minute", None),
        ("subprotocols", "grpcbridge"),
        ("subprotocols", ["has space"]),
        ("subprotocols", [""]),
        ("trusted_proxies", ["10.0.0.0/40"]),
        ("allowed_origins", ["ftp://x"]),
        ("allowed_origins", [""]),
        ("allowed_origins", ["https://app.example/path"]),
        ("allowed_origins", ["https://"]),
        ("allowed_origins", ["app.example/x"]),
        ("max_message_bytes", "16MiB"),
        ("buffer_bytes", 65536.5),
        ("keyfile", "/nonexistent/key.pem"),
        ("metrics_listen", "nonsense"),
        ("metrics_listen", "unix:/tmp/metrics.sock"),
        ("authenticate", "not callable"),
    ],
)
def test_bridge_config_errors_name_the_field(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"backend": "127.0.0.1:50051", field: value}
    with pytest.raises(ConfigError) as exc:
        BridgeConfig(**kwargs)
    check_names(exc, field)


def test_bridge_config_defaults_are_valid_and_derived() -> None:
    config = BridgeConfig(backend="127.0.0.1:50051")
    assert config.backend_address == SocketAddress(host="127.0.0.1", port=50051)
    assert config.listen_address.port == 8080
    assert config.metrics_address is None
    assert config.subprotocols == ("grpcbridge",)
    assert config.origin_policy.allows(None, None)
    assert config.trusted_networks == ()


def test_bridge_config_derived_forms() -> None:
    config = BridgeConfig(backend="unix:/run/g.sock", listen="[::1]:0",
                          metrics_listen="localhost:0", trusted_proxies=["10.0.0.0/8"],
                          allowed_origins=["https://app.example"], subprotocols=["a", "b"])
    assert config.backend_address.path == "/run/g.sock"
    assert config.listen_address == SocketAddress(host="::1", port=0)
    assert config.metrics_address == SocketAddress(host="localhost", port=0)
    assert [str(n) for n in config.trusted_networks] == ["10.0.0.0/8"]
    assert config.origin_policy.allows("https://app.example", "other")
    assert config.subprotocols == ("a", "b")
    assert config.allowed_origins == ("https://app.example",)


@pytest.mark.parametrize("backend", ["10.1.2.3:50051", "grpc.example.com:443",
                                     "0.0.0.0:50051", "[2001:db8::1]:50051"])
def test_remote_backend_refused_unless_allowed(backend: str) -> None:
    with pytest.raises(ConfigError) as exc:
        BridgeConfig(backend=backend)
    check_names(exc, "backend")
    assert "allow_remote_backend" in str(exc.value)
    assert BridgeConfig(backend=backend, allow_remote_backend=True).backend_address


@pytest.mark.parametrize("backend", ["127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/x.sock"])
def test_local_backends_accepted(backend: str) -> None:
    assert BridgeConfig(backend=backend).backend_address.is_loopback()


@pytest.mark.parametrize(("ping", "idle"), [(20, 20), (20, 10), (0.2, 0.1)])
def test_idle_timeout_must_exceed_ping_interval(ping: float, idle: float) -> None:
    with pytest.raises(ConfigError) as exc:
        BridgeConfig(backend="127.0.0.1:1", ping_interval=ping, idle_timeout=idle)
    check_names(exc, "idle_timeout")
    check_names(exc, "ping_interval")
    with pytest.raises(ConfigError, match="idle_timeout"):
        ForwarderConfig(target="ws://h/grpc", ping_interval=ping, idle_timeout=idle)


def test_disabled_ping_or_idle_is_fine() -> None:
    BridgeConfig(backend="127.0.0.1:1", ping_interval=0, idle_timeout=5)
    BridgeConfig(backend="127.0.0.1:1", ping_interval=30, idle_timeout=0)
    ForwarderConfig(target="ws://h/grpc", ping_interval=0, idle_timeout=5)


def test_certfile_without_keyfile(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError) as exc:
        BridgeConfig(backend="127.0.0.1:1", certfile=str(cert))
    check_names(exc, "certfile")
    check_names(exc, "keyfile")
    with pytest.raises(ConfigError, match="certfile"):
        BridgeConfig(backend="127.0.0.1:1", certfile=str(tmp_path / "missing.pem"),
                     keyfile=str(cert))
    # Both present (contents are checked when the bridge starts).
    BridgeConfig(backend="127.0.0.1:1", certfile=str(cert), keyfile=str(cert))


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.168.1.10:9464", "[::]:9464",
                                    "metrics.example:9464"])
def test_metrics_on_non_loopback_refused(listen: str) -> None:
    with pytest.raises(ConfigError) as exc:
        BridgeConfig(backend="127.0.0.1:1", metrics_listen=listen)
    check_names(exc, "metrics_listen")
    assert "allow_remote_metrics" in str(exc.value)
    config = BridgeConfig(backend="127.0.0.1:1", metrics_listen=listen, allow_remote_metrics=True)
    assert config.metrics_address is not None


def test_config_is_frozen() -> None:
    config = BridgeConfig(backend="127.0.0.1:1")
    with pytest.raises(AttributeError):
        config.backend = "10.0.0.1:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [
        ("target", "", "target"),
        ("target", "http://h/grpc", "target"),
        ("listen", "nonsense", "listen"),
        ("listen", "h:70000", "listen"),
        ("handshake_timeout", 0, "handshake_timeout"),
        ("ping_interval", -1, "ping_interval"),
        ("idle_timeout", -1, "idle_timeout"),
        ("max_message_bytes", 10, "max_message_bytes"),
        ("buffer_bytes", 10, "buffer_bytes"),
        ("cacert", "/nonexistent/ca.pem", "cacert"),
        ("headers", {"Bad:Name": "v"}, "header"),
        ("headers", {"X-Ok": "line\r\nbreak"}, "header"),
        ("headers", {"": "v"}, "header"),
        ("bearer_token", "", "bearer_token"),
        ("bearer_token", "has space", "bearer_token"),
        ("bearer_token", "line\nbreak", "bearer_token"),
        ("subprotocols", "grpcbridge", "subprotocols"),
        ("subprotocols", ["bad proto"], "subprotocols"),
    ],
)
def test_forwarder_config_errors_name_the_field(field: str, value: Any, name: str) -> None:
    kwargs: dict[str, Any] = {"target": "ws://bridge.example:8080/grpc", field: value}
    with pytest.raises(ConfigError) as exc:
        ForwarderConfig(**kwargs)
    check_names(exc, name)


def test_forwarder_tls_rules() -> None:
    with pytest.raises(TargetError, match="never downgrades"):
        ForwarderConfig(target="ws://bridge.example/grpc", tls=True)
    config = ForwarderConfig(target="bridge.example/grpc", tls=True)
    assert config.parsed_target.url == "wss://bridge.example/grpc"
    config = ForwarderConfig(target=":8080/grpc")
    assert config.parsed_target.url == "ws://localhost:8080/grpc"


def test_forwarder_cacert_needs_wss(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="cacert"):
        ForwarderConfig(target="ws://h/grpc", cacert=str(ca))
    assert ForwarderConfig(target="wss://h/grpc", cacert=str(ca)).cacert == str(ca)


def test_forwarder_defaults_and_copies() -> None:
    headers = {"X-Tenant": "a"}
    config = ForwarderConfig(target="ws://h:1/grpc", headers=headers, subprotocols=["grpcbridge"])
    headers["X-Tenant"] = "changed"
    assert config.headers == {"X-Tenant": "a"}
    assert config.subprotocols == ("grpcbridge",)
    assert config.listen_address == SocketAddress(host="127.0.0.1", port=50052)


# ------------------------------------------------- hostile clients (issue 8): admission


class TestRejectionHeaders:
    def test_response_headers_collects_retry_after_upgrade_and_extras(self) -> None:
        assert Rejection(404, "x").response_headers() == ()
        assert Rejection(429, "x", retry_after=3).response_headers() == (("Retry-After", "3"),)
        assert Rejection(426, "x").response_headers() == (("Upgrade", "websocket"),)
        extra = Rejection(401, "x", headers=(("WWW-Authenticate", "Bearer"),))
        assert extra.response_headers() == (("WWW-Authenticate", "Bearer"),)

    @pytest.mark.parametrize("header", [("X-A", "a\r\nSet-Cookie: x=1"), ("X A", "v"),
                                        ("Content-Length", "0"), ("retry-after", "1")])
    def test_bad_or_reserved_headers_are_refused(self, header: tuple[str, str]) -> None:
        with pytest.raises(ValueError, match="Rejection header"):
            Rejection(403, "x", headers=(header,))

    def test_bearer_401_challenges_and_403_names_the_error(self) -> None:
        auth = BearerTokenAuth(TOKEN)
        missing = auth(request())
        wrong = auth(request({"authorization": ["Bearer nope"]}))
        assert missing is not None and wrong is not None
        assert ("WWW-Authenticate", 'Bearer realm="grpcbridge"') in missing.response_headers()
        assert dict(wrong.response_headers())["WWW-Authenticate"] == (
            'Bearer realm="grpcbridge", error="invalid_token"')

    def test_bearer_survives_lone_surrogates(self) -> None:
        rejection = BearerTokenAuth(TOKEN)(request({"authorization": ["Bearer \udcff"]}))
        assert rejection is not None and rejection.status == 403


class TestOriginWildcards:
    def test_bare_wildcard_matches_subdomains_at_any_depth_and_any_port(self) -> None:
        policy = OriginPolicy(["*.Example.com"])
        for origin in ("https://app.example.com", "http://a.b.example.com:3000",
                       "https://APP.example.com."):
            assert policy.allows(origin, "bridge.test"), origin
        for origin in ("https://example.com", "https://evilexample.com",
                       "https://example.com.evil.test", "https://a.example.co",
                       "https://*.example.com", "null"):
            assert not policy.allows(origin, "bridge.test"), origin

    def test_bare_wildcard_with_port_matches_that_port(self) -> None:
        policy = OriginPolicy(["*.example.com:3000"])
        assert policy.allows("http://a.example.com:3000", "bridge.test")
        assert not policy.allows("http://a.example.com:3001", "bridge.test")
        assert not policy.allows("http://a.example.com", "bridge.test")

    def test_origin_wildcard_matches_scheme_and_port_exactly(self) -> None:
        policy = OriginPolicy(["https://*.example.com"])
        assert policy.allows("https://app.example.com", "bridge.test")
        assert policy.allows("https://a.b.example.com/", "bridge.test")
        assert not policy.allows("http://app.example.com", "bridge.test")
        assert not policy.allows("https://app.example.com:8443", "bridge.test")
        assert not policy.allows("https://example.com", "bridge.test")
        assert OriginPolicy(["https://*.example.com:8443"]).allows(
            "https://app.example.com:8443", "bridge.test")

    @pytest.mark.parametrize("entry", ["foo*.com", "*example.com", "a.*.com", "*.*.com",
                                       "*.", "**.example.com", "https://*example.com",
                                       "https://a.*.example.com", "*.[::1]"])
    def test_other_star_uses_are_refused_naming_the_supported_form(self, entry: str) -> None:
        with pytest.raises(ConfigError, match=r"allowed_origins: .*leading '\*\.'"):
            OriginPolicy([entry])

    @pytest.mark.parametrize("origin", ["http://[abc", "http://[::1", "https://a b.example",
                                        "http://app.example.com:99999", "http://\u212aa.com",
                                        "http://user@bridge.test", "//bridge.test", "http://"])
    def test_malformed_origins_are_refused_without_exceptions(self, origin: str) -> None:
        assert not OriginPolicy(["k.a.com", "*.com"]).allows(origin, "bridge.test")

    def test_same_host_rule_normalises_case_trailing_dot_and_ipv6(self) -> None:
        policy = OriginPolicy()
        assert policy.allows("http://Bridge.Test.:8080", "bridge.test:8080")
        assert policy.allows("http://[0:0::1]:8080", "[::1]:8080")
        assert not policy.allows("http://bridge.test:8080", "bridge.test:8080, evil.test")


class TestHostPolicy:
    def test_empty_list_checks_nothing(self) -> None:
        policy = HostPolicy()
        assert not policy.enabled
        assert policy.allows(None) and policy.allows("evil.example") and policy.allows("\x00")

    def test_host_without_port_matches_any_port_case_and_trailing_dot(self) -> None:
        policy = HostPolicy(["Bridge.Example.com"])
        assert policy.enabled
        for host in ("bridge.example.com", "BRIDGE.example.com:8080", "bridge.example.com.",
                     " bridge.example.com.:443 "):
            assert policy.allows(host), host
        for refused in ("evil.example", "bridge.example.com.evil", "a.bridge.example.com",
                        "bridge.example.com:", "bridge.example.com:x",
                        "bridge.example.com:70000", "", None):
            assert not policy.allows(refused), refused

    def test_port_entries_and_ipv6_literals(self) -> None:
        policy = HostPolicy(["localhost:8080", "[::1]:8080", "127.0.0.1"])
        assert policy.allows("localhost:8080")
        assert not policy.allows("localhost:8081") and not policy.allows("localhost")
        assert policy.allows("[::1]:8080") and policy.allows("[0::1]:8080")
        assert not policy.allows("[::1]") and not policy.allows("::1:8080")
        assert policy.allows("127.0.0.1:9999")

    def test_wildcard_and_star(self) -> None:
        policy = HostPolicy(["*.example.com"])
        assert policy.allows("a.example.com") and policy.allows("a.b.example.com:1")
        assert not policy.allows("example.com") and not policy.allows("evilexample.com")
        star = HostPolicy(["*"])
        assert star.allows("anything at all") and not star.allows(None)

    @pytest.mark.parametrize("entry", ["", " ", "bridge.example.com/x", "http://bridge",
                                       "host:", "host:99999", "[::1", "a..b", "b*.com",
                                       "a.*.com", "*", "user@host"])
    def test_bad_entries_are_config_errors_naming_the_setting(self, entry: str) -> None:
        if entry == "*":
            assert HostPolicy([entry]).enabled
            return
        with pytest.raises(ConfigError, match="allowed_hosts"):
            HostPolicy([entry])

    def test_one_string_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="list"):
            HostPolicy("bridge.example.com")

    def test_bridge_config_validates_and_keeps_allowed_hosts(self) -> None:
        config = BridgeConfig(backend="127.0.0.1:1", allowed_hosts=["bridge.example.com"])
        assert config.allowed_hosts == ("bridge.example.com",)
        assert config.host_policy.allows("bridge.example.com:8080")
        assert not BridgeConfig(backend="127.0.0.1:1").host_policy.enabled
        for bad in (["*x.com"], "bridge.example.com", ["a/b"]):
            with pytest.raises(ConfigError) as exc:
                BridgeConfig(backend="127.0.0.1:1", allowed_hosts=bad)
            check_names(exc, "allowed_hosts")


class TestLoggablePath:
    def test_parameters_and_query_are_cut(self) -> None:
        assert loggable_path("/grpc;access_token=s3cret") == "/grpc"
        assert loggable_path("/grpc?access_token=s3cret") == "/grpc"
        assert loggable_path("/grpc%3Baccess_token=s3cret") == "/grpc"
        assert loggable_path("/a/b%3fx") == "/a/b"
        assert loggable_path("/plain/path") == "/plain/path"

    def test_non_printables_are_escaped_and_length_is_bounded(self) -> None:
        assert loggable_path("/a\nb\x1b[31m\u2028") == "/a\\nb\\x1b[31m\\u2028"
        long = loggable_path("/" + "x" * 10_000)
        assert len(long) == LOGGABLE_PATH_LIMIT and long.endswith("...")
        assert len(loggable_path("\x00" * 1000)) <= LOGGABLE_PATH_LIMIT
