"""Fetching an image URL without letting the service be used against its own network.

Each hop (the URL, then every redirect) is resolved here, every address it resolves
to is checked against an allow-list (only globally routable unicast addresses, judged
by the IPv4 address an IPv6 form embeds; anything else only when the host or network
is on the configured allow-list), and the connection is made
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
        """An allow-list: globally routable unicast addresses (``globally_routable``),
        or any address inside an allow-listed network (an IPv6 form that embeds an IPv4
        address is admitted by a network holding either)."""
        nets = self._allowed_networks()
        if nets:
            inner = embedded_ipv4(addr) if isinstance(addr, ipaddress.IPv6Address) else None
            for candidate in (addr, inner):
                if candidate is not None and any(candidate in net for net in nets):
                    return True
        return globally_routable(addr)


# Never fetched from unless allow-listed: IANA's special-purpose registries (RFC 6890 and
# its updates) whole, not just the ranges ``ipaddress.is_global`` knows (Python 3.11
# calls 192.0.0.0/24, multicast, 6to4 and NAT64 global). Some are global in the
# registry (a few anycast services in 2001::/23) but no image lives there.
_NOT_GLOBAL: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata services
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
        "::/8",  # unspecified, loopback, IPv4-compatible and -translated, local NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments: Teredo, benchmarking, ORCHID
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4 (judged by its embedded address before this table)
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")  # all IANA has allocated for it
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a connection to ``addr`` actually reaches, for the IPv6 forms
    that carry one where it is known: IPv4-mapped (``::ffff:a.b.c.d``, the socket
    speaks IPv4), NAT64's well-known prefix (the translator connects to it) and 6to4
    (``2002:AABB:CCDD::/48``, tunnelled to it). Teredo, whose client address is
    obfuscated and whose server relays, is not judged this way: it is refused."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr.sixtofour


def globally_routable(addr: IPAddress) -> bool:
    """True only for a globally routable unicast address: an IPv6 form that embeds an
    IPv4 address is judged by that address (``embedded_ipv4``); IPv6 must be global
    unicast (2000::/3); nothing in the special-purpose ranges (``_NOT_GLOBAL``)."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            return globally_routable(inner)
        if addr not in _GLOBAL_UNICAST_V6:
            return False
    if any(addr in net for net in _NOT_GLOBAL):
        return False
    return addr.is_global and not (addr.is_multicast or addr.is_reserved)


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
    allowed = policy.host_allowed(host) or all(policy.address_allowed(a) for a in addresses)
    if not allowed:
        # The address itself is not named: a caller must not learn how the service's
        # own resolver sees an intranet name.
        raise ImageUrlError(
            f"{host!r} resolves to a private or local address (not globally routable); "
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


@dataclass(frozen=True)
class Answer:
    """A receiver's answer to a POST: its status and the first bytes of its body."""

    status_code: int
    head: bytes  # at most the ``max_answer_bytes`` asked for
    truncated: bool  # the body went on past ``head``; the rest was never read


async def post_json(
    url: str, body: bytes, headers: dict[str, str], policy: UrlPolicy, max_answer_bytes: int
) -> Answer:
    """POST ``body`` to ``url`` under the same address checks as image fetches (the
    connection goes to the checked address; redirects are not followed).

    One deadline, ``policy.timeout_s``, covers the whole exchange: resolving,
    connecting, sending, the answer's headers and its body, so a receiver that answers
    a byte at a time cannot hold the caller longer (httpx's own timeouts are per read).
    The answer is read as it arrives, raw (no decompression), up to
    ``max_answer_bytes``; then the connection is closed. ``ImageUrlError`` says why no
    answer came."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            pinned, host_headers, extensions = await _pinned(url, policy)
            all_headers = {**host_headers, "Content-Type": "application/json", **headers}
            async with httpx.AsyncClient(
                follow_redirects=False, trust_env=False, timeout=policy.timeout_s
            ) as client:
                request = client.build_request(
                    "POST", pinned, content=body, headers=all_headers, extensions=extensions
                )
                response = await client.send(request, stream=True)
                try:
                    return await _answer(response, max_answer_bytes)
                finally:
                    await response.aclose()
    except TimeoutError as exc:
        raise ImageUrlError(f"the receiver did not answer within {policy.timeout_s:g}s") from exc
    except httpx.HTTPError as exc:
        raise ImageUrlError(f"the receiver could not be reached ({type(exc).__name__})") from exc


async def _answer(response: httpx.Response, max_bytes: int) -> Answer:
    """The status and at most ``max_bytes`` of the body, counted as they arrive."""
    head = bytearray()
    async for chunk in response.aiter_raw():
        room = max_bytes - len(head)
        head += chunk[:room]
        if len(chunk) > room:
            return Answer(response.status_code, bytes(head), truncated=True)
    return Answer(response.status_code, bytes(head), truncated=False)
