"""Property tests of everything that parses untrusted input (issue 8, hostile clients).

For arbitrary input each parser raises only its documented exceptions (usually none),
decides the same way twice and the same way as a fresh instance, and keeps its promises
(wildcards never match the apex or a look-alike suffix, sanitized paths stay clean...).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlencode

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from grpcbridge.core.admission import (
    BearerTokenAuth,
    HandshakeRequest,
    HostPolicy,
    OriginPolicy,
    Rejection,
    client_identity,
    loggable_path,
    parse_networks,
)
from grpcbridge.core.errors import ConfigError, TargetError
from grpcbridge.core.target import SocketAddress, Target, parse_address, parse_target

# No example database: runs leave no files behind and every run explores afresh.
FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
#: For the tests whose inputs are costlier to generate (many strategies at once).
LEAN = settings(FAST, max_examples=100)

# ------------------------------------------------------------------- strategies

LABEL = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,6}", fullmatch=True)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PORT = st.integers(1, 65535)
OPTIONAL_PORT = st.one_of(st.just(""), PORT.map(lambda port: f":{port}"))
#: Text made of the characters host and origin parsers care about, plus traps: KELVIN SIGN
#: lower-cases to "k", NUL, spaces, brackets, wildcards, path and query delimiters.
TRICKY = st.text(alphabet="abkz019.-_:[]*;?%/@ \tAZ\u212a\x00\udcff", max_size=30)
FUZZ = st.one_of(st.text(max_size=60), TRICKY)
SCHEME = st.sampled_from(["http", "https", "HTTPS", "ws", "chrome-extension", "x"])
ORIGIN = st.one_of(
    FUZZ,
    st.builds(lambda scheme, rest: f"{scheme}://{rest}", SCHEME, TRICKY),
    st.builds(lambda scheme, host, port: f"{scheme}://{host}{port}", SCHEME, HOSTNAME,
              OPTIONAL_PORT),
    st.just("null"),
)
HOST_HEADER = st.one_of(
    st.none(), FUZZ, st.builds(lambda host, port: host + port, HOSTNAME, OPTIONAL_PORT))
ORIGIN_ENTRY = st.one_of(
    st.just("*"),
    st.builds(lambda wild, host, port: wild + host + port,
              st.sampled_from(["", "*."]), HOSTNAME, OPTIONAL_PORT),
    st.builds(lambda scheme, wild, host, port: f"{scheme}://{wild}{host}{port}",
              st.sampled_from(["http", "https"]), st.sampled_from(["", "*."]), HOSTNAME,
              OPTIONAL_PORT),
)
HOST_ENTRY = st.one_of(
    st.just("*"),
    st.builds(lambda wild, host, port: wild + host + port,
              st.sampled_from(["", "*."]), HOSTNAME, OPTIONAL_PORT),
    st.builds(lambda port: f"[::1]{port}", OPTIONAL_PORT),
)


Made = TypeVar("Made")
Decision = TypeVar("Decision")


def agree(make: Callable[[], Made], decide: Callable[[Made], Decision]) -> Decision:
    """The decision of a fresh instance, checked equal on a second call and a second
    instance (determinism)."""
    first = make()
    decision = decide(first)
    assert decide(first) == decision
    assert decide(make()) == decision
    return decision


# ---------------------------------------------------------------- OriginPolicy


@FAST
@given(st.lists(FUZZ, max_size=3))
def test_origin_policy_construction_raises_only_config_error(entries: list[str]) -> None:
    try:
        OriginPolicy(entries)
    except ConfigError as exc:
        assert "allowed_origins" in str(exc)


@LEAN
@given(st.lists(ORIGIN_ENTRY, max_size=4), ORIGIN, HOST_HEADER)
@example([], "http://[abc", "bridge.test")
@example(["k.a.com"], "http://\u212a.a.com", None)
def test_origin_policy_allows_any_input_deterministically(
        entries: list[str], origin: str, host: str | None) -> None:
    decision = agree(lambda: OriginPolicy(entries),
                     lambda policy: policy.allows(origin, host))
    assert isinstance(decision, bool)
    if "*" in entries:
        assert decision
    if not origin.isascii():
        # only "*" or the same-host rule (which needs an ASCII origin) can pass it
        assert not decision or "*" in entries


@FAST
@given(HOSTNAME, LABEL, SCHEME, OPTIONAL_PORT, st.sampled_from(["", "https://"]))
def test_wildcard_matches_subdomains_never_the_apex_or_a_look_alike(
        suffix: str, label: str, scheme: str, port: str, form: str) -> None:
    scheme = "https" if form else scheme
    policy = OriginPolicy([f"{form}*.{suffix}{port}"])
    assert policy.allows(f"{scheme}://{label}.{suffix}{port}", "bridge.invalid")
    assert policy.allows(f"{scheme}://{label}.{label}.{suffix}{port}", "bridge.invalid")
    other_port = "" if port else ":8443"
    assert policy.allows(f"{scheme}://{label}.{suffix}{other_port}", "bridge.invalid") == (
        not port and not form)  # a bare entry without a port takes any port
    for other in (suffix, label + suffix, f"{label}.{suffix}.evil", f"{label}-{suffix}",
                  f"{label}.{suffix}x"):
        assert not policy.allows(f"{scheme}://{other}{port}", "bridge.invalid"), other


@FAST
@given(FUZZ, st.integers(0, 3))
def test_star_only_as_documented(host: str, where: int) -> None:
    """Any '*' except '*' alone or a leading '*.' before a valid host is refused at
    construction with the supported form in the message."""
    entry = [f"{host}*", f"*{host}", f"a.*.{host}", f"https://{host}*.com"][where]
    try:
        OriginPolicy([entry])
    except ConfigError as exc:
        assert "'*.'" in str(exc) or "not an http(s) origin" in str(exc)
    else:
        body = entry.strip().lower().split("://")[-1]
        assert entry.strip() == "*" or (body.startswith("*.") and "*" not in body[2:])


@FAST
@given(HOSTNAME, OPTIONAL_PORT, SCHEME)
def test_same_host_rule_without_entries(host: str, port: str, scheme: str) -> None:
    assert OriginPolicy().allows(f"{scheme}://{host}{port}", f"{host.upper()}{port}")
    assert not OriginPolicy().allows(f"{scheme}://{host}{port}", f"evil.{host}{port}")


# ------------------------------------------------------------------ HostPolicy


@FAST
@given(st.lists(FUZZ, max_size=3))
def test_host_policy_construction_raises_only_config_error(entries: list[str]) -> None:
    try:
        HostPolicy(entries)
    except ConfigError as exc:
        assert "allowed_hosts" in str(exc)


@LEAN
@given(st.lists(HOST_ENTRY, max_size=4), HOST_HEADER)
def test_host_policy_allows_any_input_deterministically(
        entries: list[str], host: str | None) -> None:
    decision = agree(lambda: HostPolicy(entries),
                     lambda policy: policy.allows(host))
    assert isinstance(decision, bool)
    if not entries:
        assert decision
    elif host is None:
        assert not decision


@FAST
@given(HOSTNAME, PORT, PORT, st.booleans())
def test_host_entry_ports_case_and_trailing_dot(
        host: str, port: int, other: int, trailing_dot: bool) -> None:
    seen = host.upper() + ("." if trailing_dot else "")
    assert HostPolicy([host]).allows(seen)
    assert HostPolicy([host]).allows(f"{seen}:{other}")
    assert HostPolicy([f"{host}:{port}"]).allows(f"{seen}:{port}")
    assert HostPolicy([f"{host}:{port}"]).allows(f"{seen}:{other}") == (port == other)
    assert not HostPolicy([f"{host}:{port}"]).allows(seen)


@FAST
@given(HOSTNAME, LABEL, OPTIONAL_PORT)
def test_host_wildcard_never_matches_the_apex_or_a_look_alike(
        suffix: str, label: str, port: str) -> None:
    policy = HostPolicy([f"*.{suffix}"])
    assert policy.allows(f"{label}.{suffix}{port}")
    for other in (suffix, label + suffix, f"{label}.{suffix}.evil", f"{label}.{suffix}x"):
        assert not policy.allows(f"{other}{port}"), other


# -------------------------------------------------------------- BearerTokenAuth

TOKEN_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20) \
    .filter(lambda token: token.strip() == token)
CANDIDATE = st.one_of(TOKEN_TEXT, st.text(max_size=20))


@FAST
@given(TOKEN_TEXT, st.dictionaries(st.sampled_from(["authorization", "x-a", "origin"]),
                                   st.lists(FUZZ, max_size=2), max_size=3),
       st.lists(FUZZ, max_size=3), FUZZ)
@example("t", {"authorization": ["Bearer \udcff"]}, [], "")
@example("t", {}, ["bearer.\udcff"], "access_token=%ff%fe&access_token")
def test_bearer_auth_never_raises_on_hostile_requests(
        token: str, headers: dict[str, list[str]], subprotocols: list[str], query: str) -> None:
    request = HandshakeRequest(path="/grpc", query=query, headers=headers, client="192.0.2.1",
                               subprotocols=tuple(subprotocols))
    decision = agree(lambda: BearerTokenAuth(token),
                     lambda auth: auth(request))
    assert decision is None or (isinstance(decision, Rejection)
                                and decision.status in (401, 403))


@FAST
@given(TOKEN_TEXT, st.one_of(st.none(), CANDIDATE), st.sampled_from(["Bearer", "bearer", "BEARER"]),
       st.lists(CANDIDATE, max_size=2), st.lists(CANDIDATE.filter(lambda c: "\x00" not in c),
                                                 max_size=2))
def test_token_accepted_iff_one_candidate_equals_it_exactly(
        token: str, header: str | None, scheme: str, subprotocols: list[str],
        query_values: list[str]) -> None:
    headers = {} if header is None else {"authorization": [f"{scheme} {header}"]}
    query = urlencode([("access_token", value) for value in query_values])
    request = HandshakeRequest(
        path="/grpc", query=query, headers=headers, client="192.0.2.1",
        subprotocols=(*(f"bearer.{value}" for value in subprotocols), "grpcbridge"))
    candidates = ([] if header is None else [header.strip()]) + subprotocols + query_values
    decision = BearerTokenAuth(token)(request)
    if token in candidates:
        assert decision is None
    else:
        assert isinstance(decision, Rejection)
        assert decision.status == (403 if candidates else 401)
        assert decision.response_headers()[0][0] == "WWW-Authenticate"


@FAST
@given(TOKEN_TEXT, st.text(min_size=1, max_size=5))
def test_prefix_or_extension_of_the_token_is_refused(token: str, extra: str) -> None:
    auth = BearerTokenAuth(token)
    for near in (token + extra, extra + token, token[:-1]):
        if near != token:
            assert auth(HandshakeRequest(path="/grpc", query="", headers={}, client="c",
                                         subprotocols=(f"bearer.{near}",))) is not None


# -------------------------------------------------------------- client_identity

PROXIES = parse_networks(["10.0.0.0/8", "fd00::/8"], what="trusted_proxies")
ADDRESS = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["10.0.0.1", "10.1.2.3", "fd00::1"]),
    TRICKY,
)
FORWARDED = st.lists(
    st.one_of(FUZZ, st.lists(ADDRESS, min_size=1, max_size=4).map(", ".join)), max_size=3)


@FAST
@given(ADDRESS, FORWARDED, st.booleans())
def test_client_identity_is_the_peer_or_an_address_from_the_header(
        peer: str, forwarded: list[str], trusted: bool) -> None:
    proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = PROXIES if trusted else ()
    identity = client_identity(peer, forwarded, proxies)
    assert client_identity(peer, forwarded, proxies) == identity
    hops = [hop.strip() for value in forwarded for hop in value.split(",")]
    assert identity == peer or identity in hops
    if identity != peer:
        assert trusted
        address = ipaddress.ip_address(identity)
        assert not any(address in network for network in PROXIES)
        assert any(ipaddress.ip_address(peer) in network for network in PROXIES)


# ---------------------------------------------------------------- targets


@FAST
@given(st.one_of(FUZZ, st.builds(lambda host, port: f"{host}:{port}", TRICKY,
                                 st.text("0123456789+-_ ", max_size=7)),
                 st.builds(lambda path: f"unix:{path}", FUZZ)))
def test_parse_address_raises_only_target_error(raw: str) -> None:
    try:
        address = parse_address(raw, allow_port_zero=True)
    except TargetError:
        return
    assert isinstance(address, SocketAddress)
    assert address.is_unix or (address.port is not None and 0 <= address.port <= 65535)
    assert parse_address(raw, allow_port_zero=True) == address


@FAST
@given(HOSTNAME, PORT)
def test_parse_address_round_trips_host_and_port(host: str, port: int) -> None:
    assert parse_address(f"{host}:{port}") == SocketAddress(host=host, port=port)


@FAST
@given(st.one_of(FUZZ, st.builds(lambda scheme, rest: scheme + rest,
                                 st.sampled_from(["ws://", "wss://", "", ":"]), TRICKY)),
       st.sampled_from([None, True, False]))
@example("ws://[abc/grpc", None)
def test_parse_target_raises_only_target_error(raw: str, tls: bool | None) -> None:
    try:
        target = parse_target(raw, tls=tls)
    except TargetError:
        return
    assert isinstance(target, Target)
    assert 0 <= target.port <= 65535 and target.resource.startswith("/")
    assert parse_target(raw, tls=tls) == target


# ------------------------------------------------------------------ loggable_path


@FAST
@given(st.one_of(FUZZ, st.text(min_size=150, max_size=400),
                 st.builds(lambda a, b: f"/{a};access_token={b}", FUZZ, FUZZ),
                 st.builds(lambda a, b: f"/{a}%3Faccess_token={b}", FUZZ, FUZZ)),
       st.integers(3, 250))
def test_loggable_path_is_clean_bounded_and_deterministic(path: str, limit: int) -> None:
    safe = loggable_path(path, limit)
    assert safe == loggable_path(path, limit)
    assert len(safe) <= limit
    assert ";" not in safe and "?" not in safe
    assert "%3b" not in safe.lower() and "%3f" not in safe.lower()
    assert all(ch.isprintable() for ch in safe)
    if "access_token=" in path:
        assert "access_token" not in safe or "access_token" in path.split("access_token=")[0]
    marks = (";", "?", "%3b", "%3f")
    clean = path.isprintable() and not any(mark in path.lower() for mark in marks)
    if clean and len(path) <= limit:
        assert safe == path
