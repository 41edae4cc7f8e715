"""The fetch guard: every URL the service fetches for someone else is checked before a packet leaves.

A URL passes when it parses, its scheme is http(s), its host is a well-formed name or
address, its port is one we allow, and every address its host resolves to is public, or when
the host (or host:port) is on the allow-list. The connection then goes to the address that
was checked (no second DNS lookup an attacker could answer differently), and every redirect
is checked the same way. Whatever httpx cannot parse or send is refused here too
(FetchRefused), so no caller sees httpx's URL errors.

IPv4 addresses count only as four decimal numbers: the C library also reads `0x7f.1`,
`2130706433`, `127.1` and `0177.0.0.1` as 127.0.0.1, so a host that ends in a number and is
not written that way is refused before any lookup. An IPv6 address carrying an IPv4 one
(mapped, 6to4, Teredo, NAT64, IPv4-compatible) is judged by the IPv4 address it carries too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import httpx

MAX_REDIRECTS = 5
Resolver = Callable[[str, int], Awaitable[list[str]]]
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # after IDNA: letters, digits, '-', '_'; no empty label
NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")  # a label the URL standard (and inet_aton) reads as a number
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the well-known prefix, the IPv4 address in the last 32 bits
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291, deprecated: ::a.b.c.d
# httpx builds the next request of a redirect even when not following it, and reports a Location it cannot
# parse as a RemoteProtocolError with this message (httpx 0.28, _redirect_url).
UNPARSABLE_LOCATION = "Invalid URL in location header"


class FetchRefused(Exception):
    """The URL is not one we fetch; the message says why (and names no address it resolved to)."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: frozenset[str] = frozenset()  # "host" or "host:port": let through although not public
    only_hosts: frozenset[str] | None = None  # if set, the host must match one ("host", "host:port", ".suffix")
    ports: frozenset[int] = frozenset({80, 443})
    resolver: Resolver | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, allow: str = "", only: str | None = None, ports: str = "80,443") -> "FetchPolicy":
        def entries(text: str) -> frozenset[str]:
            return frozenset(e.strip().lower() for e in text.split(",") if e.strip())

        return cls(
            entries(allow),
            entries(only) if only is not None else None,
            frozenset(int(p) for p in ports.split(",") if p.strip()),
        )


def _matches(entries: frozenset[str], host: str, port: int) -> bool:
    for entry in entries:
        if entry in (host, f"{host}:{port}"):
            return True
        if entry.startswith(".") and host.endswith(entry):
            return True
    return False


def _carried_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, and how ("" when it carries none)."""
    if ip.sixtofour:
        return "6to4", [ip.sixtofour]
    if ip.teredo:
        return "Teredo", list(ip.teredo)  # the server and the client
    if ip in NAT64:
        return "NAT64", [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip in IPV4_COMPATIBLE and int(ip) > 1:  # not :: nor ::1
        return "IPv4-compatible", [ipaddress.IPv4Address(int(ip))]
    return "", []


def address_problem(address: str) -> str | None:
    """Why an address is not public, or None when it is."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip.is_site_local:
            return "a site-local address"
        else:
            how, carried = _carried_ipv4(ip)
            for inner in carried:
                problem = address_problem(str(inner))
                if problem:
                    return f"{problem}, carried by {how}"
            if how == "NAT64":  # a public IPv4 address through the gateway: what DNS64 answers for IPv4-only hosts
                return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_private:
        return "a private address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return "not a public address"
    if getattr(ip, "scope_id", None):
        return "an address with a zone index"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})  # the address: a str for IPv4 and IPv6


def parse(url: str, base: str | None = None) -> httpx.URL:
    """`url` (a redirect's Location when `base` is given) as httpx reads it; FetchRefused when it cannot."""
    try:
        parsed = httpx.URL(base).join(url) if base is not None else httpx.URL(url)
        _ = parsed.host  # decodes the host's A-labels: `xn--` and other bad punycode raise here, not later
        return parsed
    except (httpx.InvalidURL, ValueError) as exc:  # idna's errors are ValueErrors, not InvalidURL
        what = "a redirect's Location" if base is not None else "the URL"
        raise FetchRefused(f"{what} cannot be parsed: {str(exc)[:200]}") from None


def host_of(parsed: httpx.URL) -> str:
    """The URL's host as DNS sees it (IDNA-encoded, lower case, no trailing dot); FetchRefused unless it is a
    well-formed name or address."""
    host = parsed.raw_host.decode("ascii", "replace").lower()  # anything not ASCII fails HOST_NAME below
    if not host:
        raise FetchRefused("the URL has no host")
    if ":" in host:  # httpx has read it as an IPv6 address
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise FetchRefused("the URL's host is not a valid IPv6 address") from None
        return host
    host = host.removesuffix(".")
    if not HOST_NAME.fullmatch(host):
        raise FetchRefused("the URL's host is not a valid host name")
    if NUMBER.fullmatch(host.rsplit(".", 1)[-1]):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise FetchRefused(
                f"{host} reads as an IPv4 address; those are fetched only as four decimal numbers "
                "(0 to 255, no leading zeros)"
            ) from None
    return host


async def check(url: str, policy: FetchPolicy) -> tuple[httpx.URL, str | None]:
    """The checked URL and the address to connect to (None: connect by name, allow-listed)."""
    parsed = parse(url)
    if parsed.scheme not in ("http", "https"):
        raise FetchRefused("only http and https URLs are fetched")
    host = host_of(parsed)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if policy.only_hosts is not None and not _matches(policy.only_hosts, host, port):
        raise FetchRefused(f"{host} is not one of the hosts this URL may point to")
    if _matches(policy.allow_hosts, host, port):
        return parsed, None
    if port not in policy.ports:
        raise FetchRefused(f"port {port} is not allowed")
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await (policy.resolver or system_resolver)(host, port)
        except OSError:
            raise FetchRefused(f"{host} does not resolve") from None
    if not addresses:
        raise FetchRefused(f"{host} does not resolve")
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise FetchRefused(f"{host} resolves to {problem}")
    return parsed, addresses[0]


@asynccontextmanager
async def guarded_stream(
    client: httpx.AsyncClient, url: str, policy: FetchPolicy, headers: dict | None = None
) -> AsyncIterator[httpx.Response]:
    """GET `url` as a stream, following up to five redirects, each one checked first."""
    for _ in range(MAX_REDIRECTS + 1):
        target, address = await check(url, policy)
        request_headers = dict(headers or {})
        extensions = {}
        if address is not None:  # connect to the address we checked, speak to the host by name
            request_headers["Host"] = target.netloc.decode()
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
            target = target.copy_with(host=address)
        response = await _send(client, target, request_headers, extensions)
        try:
            if response.is_redirect and "location" in response.headers:
                url = str(parse(response.headers["location"], base=url))
                continue
            yield response
            return
        finally:
            await response.aclose()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


async def _send(client: httpx.AsyncClient, target: httpx.URL, headers: dict, extensions: dict) -> httpx.Response:
    """GET `target` as a stream; what httpx cannot request, or whose redirect it cannot parse, is refused."""
    try:
        request = client.build_request("GET", target, headers=headers, extensions=extensions)
        return await client.send(request, stream=True, follow_redirects=False)
    except httpx.RemoteProtocolError as exc:
        if str(exc).startswith(UNPARSABLE_LOCATION):
            raise FetchRefused(f"a redirect's Location cannot be parsed: {str(exc)[:200]}") from None
        raise
    except (httpx.InvalidURL, UnicodeError) as exc:  # a Location httpx's own redirect handling stumbled on
        raise FetchRefused(f"a redirect's Location cannot be parsed: {str(exc)[:200]}") from None
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
        raise FetchRefused(f"this URL cannot be requested: {type(exc).__name__}: {str(exc)[:200]}") from None
