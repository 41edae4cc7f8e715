"""The fetch guard: every URL the service fetches for someone else is checked before a packet leaves.

A URL passes when its scheme is http(s), its port is one we allow, and every address its
host resolves to is public, or when the host (or host:port) is on the allow-list. The
connection then goes to the address that was checked (no second DNS lookup an attacker
could answer differently), and every redirect is checked the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import httpx

MAX_REDIRECTS = 5
Resolver = Callable[[str, int], Awaitable[list[str]]]


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

        return cls(entries(allow), entries(only) if only is not None else None,
                   frozenset(int(p) for p in ports.split(",") if p.strip()))


def _matches(entries: frozenset[str], host: str, port: int) -> bool:
    for entry in entries:
        if entry in (host, f"{host}:{port}"):
            return True
        if entry.startswith(".") and host.endswith(entry):
            return True
    return False


def address_problem(address: str) -> str | None:
    """Why an address is not public, or None when it is."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_private:
        return "a private address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return "not a public address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


async def check(url: str, policy: FetchPolicy) -> tuple[httpx.URL, str | None]:
    """The checked URL and the address to connect to (None: connect by name, allow-listed)."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise FetchRefused("only http and https URLs are fetched")
    host = (parsed.host or "").lower().rstrip(".")
    if not host:
        raise FetchRefused("the URL has no host")
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
async def guarded_stream(client: httpx.AsyncClient, url: str, policy: FetchPolicy,
                         headers: dict | None = None) -> AsyncIterator[httpx.Response]:
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
        request = client.build_request("GET", target, headers=request_headers, extensions=extensions)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            if response.is_redirect and "location" in response.headers:
                url = str(httpx.URL(url).join(response.headers["location"]))
                continue
            yield response
            return
        finally:
            await response.aclose()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")
