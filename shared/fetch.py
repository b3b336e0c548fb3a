"""Fetching an image URL without letting the service be used against its own network.

Each hop (the URL, then every redirect) is resolved here, every address it resolves
to is checked (no private, loopback, link-local, multicast, reserved or unspecified
address unless the host or network is on the allow-list), and the connection is made
to the checked address itself, so a DNS answer that changes between the check and the
connection (rebinding) cannot slip through. Redirects are counted, the body is
streamed with a byte cap, and the whole fetch has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from shared.errors import ImageTooLargeError, ImageUrlError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class UrlPolicy:
    """Limits and the allow-list for fetching image URLs."""

    timeout_s: float
    max_redirects: int
    max_bytes: int
    allow_hosts: tuple[str, ...] = ()

    def _allowed_networks(self) -> list[IPNetwork]:
        nets = []
        for entry in self.allow_hosts:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        return nets

    def host_allowed(self, host: str) -> bool:
        """True for an allow-listed host name."""
        return host.lower().rstrip(".") in self.allow_hosts

    def address_allowed(self, addr: IPAddress) -> bool:
        """Public addresses, or any address inside an allow-listed network."""
        if any(addr in net for net in self._allowed_networks()):
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return not (
            addr.is_private
            or addr.is_loopback
            or addr.is_link_local
            or addr.is_multicast
            or addr.is_reserved
            or addr.is_unspecified
        )


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageUrlError(f"cannot resolve {host!r} ({exc.strerror})") from exc
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def check_url(url: str, policy: UrlPolicy, what: str) -> None:
    """Refuse a URL the service must not call (a webhook, say) with the same guards as
    image URLs: http(s), a host, and no private or local address off the allow-list.
    ``ImageUrlError`` names ``what``."""
    await _checked_address(url, policy, what)


async def _checked_address(
    url: str, policy: UrlPolicy, what: str = "the image URL"
) -> tuple[str, str, int, IPAddress]:
    try:
        parts = urlsplit(url)
        host, explicit_port = parts.hostname, parts.port
    except ValueError as exc:  # an unclosed IPv6 bracket, a port out of range
        raise ImageUrlError(f"{what} cannot be parsed ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise ImageUrlError(f"only http and https URLs are accepted, not {parts.scheme!r}")
    if not host:
        raise ImageUrlError(f"{what} has no host")
    port = explicit_port or (443 if parts.scheme == "https" else 80)
    addresses = await resolve(host, port)
    if not addresses:
        raise ImageUrlError(f"{host!r} resolves to no address")
    if not policy.host_allowed(host):
        refused = [a for a in addresses if not policy.address_allowed(a)]
        if refused:
            raise ImageUrlError(
                f"{host!r} resolves to {refused[0]}, a private or local address; "
                "intranet hosts must be on the allow-list (OFA_URL_ALLOW_HOSTS)"
            )
    return parts.scheme, host, port, addresses[0]


async def _pinned(url: str, policy: UrlPolicy) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL with the checked address in place of the host, Host header, TLS name): the
    connection goes to the address that was checked, the server still sees its name."""
    scheme, host, port, addr = await _checked_address(url, policy)
    parts = urlsplit(url)
    ip_host = f"[{addr}]" if addr.version == 6 else str(addr)
    pinned = urlunsplit((scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
    default_port = 443 if scheme == "https" else 80
    headers = {"Host": host if port == default_port else f"{host}:{port}"}
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return pinned, headers, extensions


@dataclass(frozen=True)
class Fetched:
    """What a fetch found: the body, or ``not_modified`` for a conditional request."""

    body: bytes | None
    etag: str | None
    last_modified: str | None
    not_modified: bool = False


async def _fetch_once(
    client: httpx.AsyncClient, url: str, policy: UrlPolicy, conditional: dict[str, str]
) -> tuple[httpx.Response, Fetched | None]:
    pinned, headers, extensions = await _pinned(url, policy)
    request = client.build_request(
        "GET", pinned, headers={**headers, **conditional}, extensions=extensions
    )
    response = await client.send(request, stream=True)
    try:
        if response.has_redirect_location:
            return response, None
        etag = response.headers.get("etag")
        modified = response.headers.get("last-modified")
        if response.status_code == 304 and conditional:
            return response, Fetched(None, etag, modified, not_modified=True)
        if response.status_code != 200:
            raise ImageUrlError(f"the image URL answered HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise ImageTooLargeError(
                f"the image at the URL is {declared} bytes; the limit is {policy.max_bytes}"
            )
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
                raise ImageTooLargeError(
                    f"the image at the URL is larger than {policy.max_bytes} bytes"
                )
        return response, Fetched(bytes(body), etag, modified)
    finally:
        await response.aclose()


async def fetch(
    url: str,
    policy: UrlPolicy,
    client: httpx.AsyncClient | None = None,
    etag: str | None = None,
    last_modified: str | None = None,
) -> Fetched:
    """GET ``url`` under the policy; with ``etag``/``last_modified`` a conditional GET
    that may answer ``not_modified``. Raises ``ImageUrlError`` / ``ImageTooLargeError``."""
    conditional = {}
    if etag:
        conditional["If-None-Match"] = etag
    if last_modified:
        conditional["If-Modified-Since"] = last_modified
    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(policy.timeout_s):
            current = url
            for _ in range(policy.max_redirects + 1):
                response, found = await _fetch_once(client, current, policy, conditional)
                if found is not None:
                    return found
                location = response.headers.get("location")
                if not location:
                    raise ImageUrlError("a redirect without a Location header")
                current = urljoin(current, location)
            raise ImageUrlError(f"more than {policy.max_redirects} redirects")
    except TimeoutError as exc:
        raise ImageUrlError(f"the image URL did not answer within {policy.timeout_s:g}s") from exc
    except httpx.HTTPError as exc:
        raise ImageUrlError(f"the image URL could not be fetched ({type(exc).__name__})") from exc
    finally:
        if own:
            await client.aclose()


async def fetch_image(url: str, policy: UrlPolicy) -> bytes:
    """The bytes at ``url``, or an ``ImageUrlError`` / ``ImageTooLargeError`` saying why not."""
    found = await fetch(url, policy)
    assert found.body is not None
    return found.body


async def post_json(
    url: str, body: bytes, headers: dict[str, str], policy: UrlPolicy
) -> httpx.Response:
    """POST ``body`` to ``url`` under the same address checks as image fetches (the
    connection goes to the checked address; redirects are not followed)."""
    pinned, host_headers, extensions = await _pinned(url, policy)
    all_headers = {**host_headers, "Content-Type": "application/json", **headers}
    async with httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=policy.timeout_s
    ) as client:
        request = client.build_request(
            "POST", pinned, content=body, headers=all_headers, extensions=extensions
        )
        return await client.send(request)
