"""Which proxy a client dials through, and how to describe a proxy's refusal (sans I/O).

A client's ``proxy`` setting is one of:

* ``True`` (:data:`FROM_ENVIRONMENT`, the default): the standard variables, read as curl and
  websockets read them: ``wss://`` targets use ``https_proxy``, ``ws://`` targets
  ``http_proxy``, both fall back to ``all_proxy``; ``no_proxy`` lists hosts reached directly.
  Each name is read in lower case first, then upper case (``HTTP_PROXY`` is ignored when
  ``REQUEST_METHOD`` is set, as urllib does, against "httpoxy"). An empty value is unset.
* a URL (``http://[user:password@]host[:port]``, ``socks5://``, ``socks5h://``,
  ``socks4://``, ``socks4a://``): always used, whatever ``no_proxy`` says;
* ``None``: no proxy, whatever the environment says.

``no_proxy`` entries are separated by commas or spaces: ``*`` (every host), a domain
(``example.com`` and ``.example.com`` both match it and its subdomains), an IP address,
a CIDR network (``10.0.0.0/8``), each optionally with ``:port`` (then only that port).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import quote, unquote, urlsplit

from .errors import ConfigError
from .target import Target, host_port, ip_or_none

#: The default ``proxy`` setting: take the proxy from the environment.
FROM_ENVIRONMENT: Final = True
#: A client's ``proxy`` option (see the module docstring).
ProxySetting = str | Literal[True] | None

#: Default port per proxy scheme (curl's: 1080 for SOCKS; 80 for HTTP as urllib).
_DEFAULT_PORTS = {"http": 80, "socks5": 1080, "socks5h": 1080, "socks4": 1080, "socks4a": 1080}
_EXAMPLE = "http://proxy.example:3128 or http://user:password@proxy.example:3128"


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """A validated proxy address. ``str()`` and ``repr()`` never show the password."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: Where the URL came from: ``"proxy"`` (given explicitly) or the variable's name.
    source: str = "proxy"

    @property
    def kind(self) -> Literal["http", "socks5", "socks4"]:
        return "http" if self.scheme == "http" else "socks5" if \
            self.scheme.startswith("socks5") else "socks4"

    @property
    def remote_dns(self) -> bool:
        """Whether the proxy resolves the target's name (``socks5h``, ``socks4a``, HTTP)."""
        return self.scheme in ("http", "socks5h", "socks4a")

    @property
    def address(self) -> str:
        """``host:port`` of the proxy."""
        return host_port(self.host, self.port)

    def __str__(self) -> str:
        """The URL with the password replaced by ``***``: safe to log."""
        user = f"{quote(self.username, safe='')}:***@" if self.username is not None else ""
        return f"{self.scheme}://{user}{self.address}"


def mask_userinfo(raw: str) -> str:
    """``raw`` (a proxy URL as given, perhaps invalid) with any password replaced by
    ``***``, for error messages."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    userinfo, at, location = rest.rpartition("@")
    if not at:
        return raw
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{location}"


def parse_proxy(raw: str, *, source: str = "proxy") -> ProxyURL:
    """Validate a proxy URL; :class:`ConfigError` says what is wrong (never showing the
    password) and how to fix it. ``source`` names the option or variable it came from.
    A value without a scheme is taken as ``http://`` (as curl does)."""
    shown = f"{source} {mask_userinfo(raw)!r}"
    text = raw.strip()
    if not text:
        raise ConfigError(f"{source} is empty; give a proxy URL like {_EXAMPLE}")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{shown} is not a valid URL ({exc}); give one like "
                          f"{_EXAMPLE}") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ConfigError(
            f"{shown}: TLS to the proxy itself (https://) is not supported; most proxies "
            "take CONNECT on plain http:// (the tunnel to a wss:// bridge is still TLS end to "
            "end), so give http://host:port")
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"{shown} has unsupported scheme {parts.scheme!r}; use http://, "
                          "socks5://, socks5h://, socks4:// or socks4a://")
    if not parts.hostname:
        raise ConfigError(f"{shown} has no host; give one like {_EXAMPLE}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{shown} has a path, query or fragment, which a proxy URL cannot "
                          f"use; give only scheme://[user:password@]host:port")
    username = password = None
    if parts.username is not None:
        if parts.password is None:
            raise ConfigError(f"{shown} has a user but no password; give user:password@ "
                              "(percent-encode ':' '@' '/' in them)")
        username, password = unquote(parts.username), unquote(parts.password)
        if scheme.startswith("socks4"):
            raise ConfigError(f"{shown}: SOCKS4 has no passwords; use socks5:// for "
                              "user:password")
    return ProxyURL(scheme=scheme, host=parts.hostname, port=port or _DEFAULT_PORTS[scheme],
                    username=username, password=password, source=source)


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """``(NAME, value)`` of the variable ``name`` (lower case first), if set and not empty."""
    for key in (name, name.upper()):
        if key == "HTTP_PROXY" and "REQUEST_METHOD" in environ:
            continue  # CGI puts the client's "Proxy:" header there (httpoxy)
        value = environ.get(key, "").strip()
        if value:
            return key, value
    return None


def resolve_proxy(target: Target, setting: ProxySetting,
                  environ: Mapping[str, str]) -> ProxyURL | None:
    """The proxy to dial ``target`` through, or None to dial it directly (module docstring);
    :class:`ConfigError` for an invalid URL, naming the variable it came from."""
    if setting is None:
        return None
    if setting is not True:
        if not isinstance(setting, str):
            raise ConfigError(f"proxy must be a URL string, True (from the environment) or "
                              f"None (no proxy), got {type(setting).__name__}")
        return parse_proxy(setting)
    no_proxy = _variable(environ, "no_proxy")
    if no_proxy is not None and bypasses(no_proxy[1], target.host, target.port):
        return None
    found = _variable(environ, "https_proxy" if target.secure else "http_proxy") \
        or _variable(environ, "all_proxy")
    if found is None:
        return None
    name, value = found
    return parse_proxy(value, source=f"${name}")


def bypasses(no_proxy: str, host: str, port: int) -> bool:
    """Whether ``no_proxy`` (the variable's value) says to reach ``host:port`` directly."""
    host = host.strip("[]").rstrip(".").lower()
    address = ip_or_none(host)
    for raw in no_proxy.replace(",", " ").split():
        if raw == "*":
            return True
        # host, [v6], v6 or net/len, with an optional :port
        pattern, port_text = raw.lower(), ""
        if pattern.startswith("["):
            pattern, _, rest = pattern[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        elif pattern.count(":") == 1:
            pattern, _, port_text = pattern.partition(":")
        if port_text.isdigit() and int(port_text) != port:
            continue
        try:  # an IP address is a network of one
            network = ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            if "/" in pattern:
                continue
        else:
            if address is not None and address in network:
                return True
            continue
        domain = pattern.removeprefix("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def refusal_message(proxy: ProxyURL, status: int, reason: str, host: str, port: int) -> str:
    """Why an HTTP proxy's answer ``status`` to ``CONNECT host:port`` means no tunnel."""
    destination = host_port(host, port)
    answered = f"proxy {proxy.address} answered HTTP {status}" + (f" {reason}" if reason else "")
    if status in (401, 407):  # tinyproxy answers wrong credentials with 401
        hint = ("the user:password in the proxy URL were refused" if proxy.username is not None
                else "give user:password in the proxy URL")
        return f"{answered}: proxy authentication required ({hint})"
    if status == 403:
        return f"{answered}: proxy refused CONNECT to {destination}"
    if status in (500, 502, 503, 504):
        return f"{answered}: proxy could not reach the bridge at {destination}"
    return f"{answered} to CONNECT {destination}"
