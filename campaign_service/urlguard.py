"""SSRF guard for URLs users give us (webhook endpoints): http(s) only, and no address that is not
globally routable (loopback, private, link-local and cloud metadata, CGNAT, multicast, reserved),
unless the operator's allowlist (WHAGO_WEBHOOK_ALLOW_CIDRS) names its network.

Checked twice: when the URL is registered, and at every connection (`GuardedResolver`), because a
name that resolved to a public address yesterday may resolve to 127.0.0.1 today."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

MAX_URL = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RefusedURL(ValueError):
    """The URL may not be called; the message says why (shown to the user)."""


def parse_allowlist(spec: str) -> tuple[Network, ...]:
    """"127.0.0.0/8, ::1" -> networks (an address alone is its /32 or /128)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


class URLGuard:
    def __init__(self, allow: Sequence[Network] = ()) -> None:
        self.allow = tuple(allow)

    def address_allowed(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow):
            return True
        return ip.is_global and not ip.is_multicast

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        for a in addresses:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
            if not self.address_allowed(ip):
                raise RefusedURL(f"{host} resolves to {ip}, which is not a public address")

    def check_syntax(self, url: str) -> tuple[str, int]:
        """Scheme, host and port of a well-formed http(s) URL (host, port), or RefusedURL."""
        if not url:
            raise RefusedURL("required")
        if len(url) > MAX_URL:
            raise RefusedURL(f"at most {MAX_URL} characters")
        if any(ord(c) < 33 or ord(c) == 127 for c in url):
            raise RefusedURL("no spaces or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise RefusedURL(f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise RefusedURL("must be an http or https URL")
        if not parts.hostname:
            raise RefusedURL("has no host")
        if parts.username or parts.password:
            raise RefusedURL("must not carry credentials")
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)

    def check(self, url: str) -> None:
        """At registration: syntax, then every address the host resolves to (blocking DNS)."""
        host, port = self.check_syntax(url)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                raise RefusedURL(f"host {host} does not resolve ({exc})") from None
            self.check_addresses(host, [str(i[4][0]) for i in infos])
        else:
            self.check_addresses(host, [str(ip)])

    def check_literal(self, url: str) -> None:
        """At connection time for IP-literal hosts (aiohttp does not resolve those)."""
        host, _ = self.check_syntax(url)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return  # a name: GuardedResolver checks what it resolves to
        self.check_addresses(host, [str(ip)])


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses names resolving to a disallowed address (at connect time)."""

    def __init__(self, guard: URLGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner or ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        try:
            self._guard.check_addresses(host, [r["host"] for r in results])
        except RefusedURL as exc:
            raise OSError(str(exc)) from None
        return results

    async def close(self) -> None:
        await self._inner.close()


def host_allowed(url: str, allowlist: str) -> bool:
    """Whether an http(s) URL's host (and port) is in an operator allowlist of "host" or "host:port"
    entries (WHAGO_WAHA_HOSTS)."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    for entry in (e.strip().lower() for e in allowlist.split(",") if e.strip()):
        h, _, p = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if (h or entry) == host and (not p or p == str(port)):
            return True
    return False
