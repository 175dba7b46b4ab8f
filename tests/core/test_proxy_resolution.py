"""Which proxy a client uses (grpcbridge.core.proxy): the explicit setting, the standard
variables as curl and websockets read them, no_proxy rules, URL validation and the messages
for proxy refusals. Pure functions: no proxy runs here (tests/client/test_proxy.py has the
real ones)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpcbridge import ConfigError
from grpcbridge.core.proxy import (
    ProxyURL,
    bypasses,
    mask_userinfo,
    parse_proxy,
    refusal_message,
    resolve_proxy,
)
from grpcbridge.core.target import parse_target

WS = parse_target("ws://bridge.example.com:8080/grpc")
WSS = parse_target("wss://bridge.example.com/grpc")


@pytest.mark.parametrize(
    ("target", "setting", "environ", "expected"),
    [
        (WS, True, {}, None),
        (WS, None, {"http_proxy": "http://p:1"}, None),  # None: off, whatever the env says
        (WS, "http://explicit:3128", {}, "http://explicit:3128"),
        # An explicit proxy is used even when no_proxy lists the target.
        (WS, "http://explicit:3128", {"no_proxy": "*"}, "http://explicit:3128"),
        # ws:// reads http_proxy, wss:// https_proxy; both fall back to all_proxy.
        (WS, True, {"HTTP_PROXY": "http://h:1", "HTTPS_PROXY": "http://s:2"}, "http://h:1"),
        (WSS, True, {"HTTP_PROXY": "http://h:1", "HTTPS_PROXY": "http://s:2"}, "http://s:2"),
        (WSS, True, {"HTTP_PROXY": "http://h:1"}, None),
        (WSS, True, {"HTTP_PROXY": "http://h:1", "ALL_PROXY": "socks5h://a:3"},
         "socks5h://a:3"),
        (WS, True, {"all_proxy": "socks5://a:3"}, "socks5://a:3"),
        # Lower case wins over upper case; empty means unset.
        (WS, True, {"http_proxy": "http://low:1", "HTTP_PROXY": "http://up:2"}, "http://low:1"),
        (WS, True, {"http_proxy": " ", "HTTP_PROXY": "http://up:2"}, "http://up:2"),
        # Under CGI, HTTP_PROXY is a client's header ("httpoxy"): ignored, http_proxy is not.
        (WS, True, {"HTTP_PROXY": "http://evil:1", "REQUEST_METHOD": "GET"}, None),
        (WS, True, {"http_proxy": "http://ok:1", "REQUEST_METHOD": "GET"}, "http://ok:1"),
        # No scheme: http://; no port: 80 for HTTP, 1080 for SOCKS.
        (WS, True, {"http_proxy": "proxy.corp:3128"}, "http://proxy.corp:3128"),
        (WS, True, {"http_proxy": "http://proxy.corp"}, "http://proxy.corp:80"),
        (WS, "socks5://s", {}, "socks5://s:1080"),
        # no_proxy bypasses proxies from the environment.
        (WS, True, {"http_proxy": "http://p:1", "no_proxy": "example.com"}, None),
        (WS, True, {"http_proxy": "http://p:1", "NO_PROXY": "other.com"}, "http://p:1"),
    ],
)
def test_resolution(target: object, setting: object, environ: dict[str, str],
                    expected: str | None) -> None:
    proxy = resolve_proxy(target, setting, environ)  # type: ignore[arg-type]
    assert (str(proxy) if proxy else None) == expected


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "expected"),
    [
        ("*", "anything.at.all", 1, True),
        ("example.com", "example.com", 80, True),
        ("example.com", "api.example.com", 80, True),
        (".example.com", "example.com", 80, True),
        (".example.com", "a.b.example.com", 80, True),
        ("*.example.com", "a.example.com", 80, True),
        ("example.com", "badexample.com", 80, False),
        ("example.com", "example.com.evil", 80, False),
        ("EXAMPLE.com.", "Example.COM", 80, True),
        ("example.com:8080", "example.com", 8080, True),
        ("example.com:8080", "example.com", 443, False),
        ("a.com, b.com,c.com", "b.com", 1, True),
        ("a.com b.com", "b.com", 1, True),
        ("10.0.0.0/8", "10.2.3.4", 1, True),
        ("10.0.0.0/8", "11.2.3.4", 1, False),
        ("10.0.0.0/8", "ten.example", 1, False),
        ("127.0.0.1", "127.0.0.1", 1, True),
        ("127.0.0.1", "127.0.0.2", 1, False),
        ("127.0.0.1:99", "127.0.0.1", 1, False),
        ("::1", "::1", 1, True),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "[::1]", 9, False),
        ("fd00::/8", "fd12::1", 1, True),
        ("localhost", "127.0.0.1", 1, False),  # names are not resolved
        ("", "example.com", 80, False),
        (",,", "example.com", 80, False),
        ("10.0.0.0/99", "10.0.0.1", 1, False),  # an invalid entry matches nothing
    ],
)
def test_no_proxy_rules(no_proxy: str, host: str, port: int, expected: bool) -> None:
    assert bypasses(no_proxy, host, port) is expected


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
# A name, not an address: a top label that starts with a letter never parses as an IP
# ("0.0.0.0" would, and addresses match NO_PROXY entries by address, not by suffix).
_top = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domain = st.builds(lambda labels, top: ".".join([*labels, top]),
                    st.lists(_label, max_size=3), _top)


@given(domain=_domain, sub=_label, others=st.lists(_domain, max_size=3),
       port=st.integers(1, 65535))
def test_listing_a_domain_bypasses_it_and_its_subdomains(
        domain: str, sub: str, others: list[str], port: int) -> None:
    listed = ",".join([*others, domain])
    assert bypasses(listed, domain, port)
    assert bypasses(listed, f"{sub}.{domain}", port)
    assert bypasses(listed, domain.upper(), port)
    # ...and nothing whose name merely ends with the same characters.
    if not any(f"x{domain}" == o or f"x{domain}".endswith("." + o) for o in others):
        assert not bypasses(listed, f"x{domain}", port)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "is empty"),
        ("ftp://proxy:21", "unsupported scheme 'ftp'"),
        ("https://proxy:443", "TLS to the proxy itself (https://) is not supported"),
        ("http://:3128", "has no host"),
        ("http://proxy:99999", "not a valid URL"),
        ("http://proxy:3128/path", "has a path"),
        ("http://user@proxy:3128", "a user but no password"),
        ("socks4://user:pw@proxy", "SOCKS4 has no passwords"),
    ],
)
def test_invalid_proxy_urls_say_what_to_do(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as failed:
        parse_proxy(raw)
    assert message in str(failed.value)


def test_passwords_never_appear_in_errors_or_reprs() -> None:
    for raw in ("ftp://user:s3cret@proxy:21", "http://user:s3cret@proxy:bad",
                "http://user:s3cret@proxy:3128/x"):
        with pytest.raises(ConfigError) as failed:
            parse_proxy(raw)
        assert "s3cret" not in str(failed.value)
        assert "user:***@" in str(failed.value)
    with pytest.raises(ConfigError, match=r"\$HTTP_PROXY 'ftp://u:\*\*\*@p'") as failed:
        resolve_proxy(WS, True, {"HTTP_PROXY": "ftp://u:s3cret@p"})
    proxy = parse_proxy("http://us%40er:p%3Ass@proxy:3128")
    assert (proxy.username, proxy.password) == ("us@er", "p:ss")
    for text in (str(proxy), repr(proxy)):
        assert "p:ss" not in text and "p%3Ass" not in text
    assert str(proxy) == "http://us%40er:***@proxy:3128"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("http://u:pw@h:1", "http://u:***@h:1"), ("u:pw@h:1", "u:***@h:1"),
     ("http://u@h", "http://u@h"), ("http://h:1", "http://h:1"),
     ("http://u:p@w@h", "http://u:***@h")],
)
def test_mask_userinfo(raw: str, expected: str) -> None:
    assert mask_userinfo(raw) == expected


def test_refusal_messages() -> None:
    plain = ProxyURL(scheme="http", host="proxy", port=3128)
    authed = ProxyURL(scheme="http", host="proxy", port=3128, username="u", password="pw")
    assert refusal_message(plain, 407, "Proxy Authentication Required", "b", 8) == (
        "proxy proxy:3128 answered HTTP 407 Proxy Authentication Required: proxy "
        "authentication required (give user:password in the proxy URL)")
    for status in (401, 407):
        assert refusal_message(authed, status, "", "b", 8).endswith(
            "(the user:password in the proxy URL were refused)")
    assert refusal_message(plain, 403, "Forbidden", "::1", 8).endswith(
        "proxy refused CONNECT to [::1]:8")
    for status in (500, 502, 503, 504):
        assert refusal_message(plain, status, "", "b", 8).endswith(
            "proxy could not reach the bridge at b:8")
    assert refusal_message(plain, 418, "Teapot", "b", 8) == (
        "proxy proxy:3128 answered HTTP 418 Teapot to CONNECT b:8")
