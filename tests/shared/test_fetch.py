"""Address checks of the image URL fetcher (no traffic: refusals happen before connecting)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from shared.errors import ImageUrlError
from shared.fetch import UrlPolicy, check_url, fetch_image

POLICY = UrlPolicy(
    timeout_s=2, max_redirects=2, max_bytes=1000, allow_hosts=("images.intranet", "10.20.0.0/16")
)


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_private_and_local_addresses_refused(addr):
    assert not POLICY.address_allowed(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ["93.184.216.34", "2606:2800:220:1::1"])
def test_public_addresses_allowed(addr):
    assert POLICY.address_allowed(ipaddress.ip_address(addr))


def test_allow_list_admits_networks_and_hosts():
    assert POLICY.address_allowed(ipaddress.ip_address("10.20.3.4"))
    assert not POLICY.address_allowed(ipaddress.ip_address("10.21.3.4"))
    assert POLICY.host_allowed("Images.Intranet.")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.jpg",
        "http://169.254.169.254/",
        "gopher://x/",
        "http:///nohost",
        "http://[::1]/a",
    ],
)
def test_fetch_refuses_without_connecting(url):
    with pytest.raises(ImageUrlError):
        asyncio.run(fetch_image(url, POLICY))


# Not globally routable, each judged without sending a packet: the resolver is stubbed.
NOT_GLOBAL = [
    "100.64.0.1",  # shared address space (carrier-grade NAT)
    "100.127.255.254",
    "192.0.0.9",  # IETF protocol assignments (Python 3.11 calls it global)
    "192.0.0.170",
    "192.0.2.1",  # documentation
    "198.51.100.7",
    "203.0.113.9",
    "198.18.0.1",  # benchmarking
    "192.88.99.1",  # 6to4 relay anycast
    "0.1.2.3",
    "224.0.0.1",  # multicast (global to Python 3.11)
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2002:6440:1::1",  # 6to4 of 100.64.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001::1",
    "2001:2::1",  # benchmarking
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::a00:1",  # local-use NAT64
    "::ffff:10.0.0.1",  # IPv4-mapped private
    "::ffff:100.64.0.1",
    "::ffff:169.254.169.254",
    "::a00:1",  # IPv4-compatible (deprecated)
    "::ffff:0:a00:1",  # IPv4-translated
    "::",
    "2001:db8::1",  # documentation
    "3fff::1",
    "100::1",  # discard-only
    "5f00::1",  # segment routing
    "fd12:3456::1",  # unique local
    "fec0::1",  # site-local
    "ff0e::1",  # multicast
]
GLOBAL = [
    "93.184.216.34",
    "8.8.8.8",
    "2606:2800:220:1::1",
    "::ffff:93.184.216.34",  # IPv4-mapped public: the connection goes to 93.184.216.34
    "64:ff9b::5db8:d822",  # NAT64 of 93.184.216.34
    "2002:5db8:d822::1",  # 6to4 of 93.184.216.34
]


@pytest.fixture
def resolves_to(monkeypatch):
    """``resolve`` stubbed: every host resolves to the addresses set, so the guard is
    tested on names without a DNS server and without a packet sent."""
    answer: list[str] = []

    async def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(a) for a in answer]

    monkeypatch.setattr("shared.fetch.resolve", resolve)

    def set_answer(*addresses: str) -> None:
        answer[:] = addresses

    return set_answer


@pytest.mark.parametrize("addr", NOT_GLOBAL)
def test_addresses_that_are_not_globally_routable_are_refused(addr, resolves_to):
    assert not POLICY.address_allowed(ipaddress.ip_address(addr))
    resolves_to("93.184.216.34", addr)  # one bad address among good ones is enough
    with pytest.raises(ImageUrlError) as refused:
        asyncio.run(check_url("http://images.example.com/a.jpg", POLICY, "the image URL"))
    text = str(refused.value)
    assert "images.example.com" in text and "private or local" in text
    # The address the service's resolver found is not told to the caller, in any form.
    for spelling in {addr, str(ipaddress.ip_address(addr)), ipaddress.ip_address(addr).exploded}:
        assert spelling not in text


@pytest.mark.parametrize("addr", GLOBAL)
def test_globally_routable_addresses_are_accepted(addr, resolves_to):
    assert POLICY.address_allowed(ipaddress.ip_address(addr))
    resolves_to(addr)
    asyncio.run(check_url("https://images.example.com/a.jpg", POLICY, "the image URL"))


def test_the_allow_list_admits_hosts_and_networks_and_their_embedded_forms(resolves_to):
    policy = UrlPolicy(
        timeout_s=2,
        max_redirects=2,
        max_bytes=1000,
        allow_hosts=("images.intranet", "10.20.0.0/16", "100.64.0.0/10", "fd00:1::/32"),
    )
    for addr in ("10.20.3.4", "::ffff:10.20.3.4", "64:ff9b::a14:304", "100.100.1.1", "fd00:1::9"):
        assert policy.address_allowed(ipaddress.ip_address(addr)), addr
    for addr in ("10.21.3.4", "::ffff:10.21.3.4", "fd00:2::9", "192.0.0.9"):
        assert not policy.address_allowed(ipaddress.ip_address(addr)), addr
    resolves_to("10.9.9.9")  # an allow-listed host may resolve to anything
    asyncio.run(check_url("http://images.intranet/a.jpg", policy, "the image URL"))
    with pytest.raises(ImageUrlError):
        asyncio.run(check_url("http://other.intranet/a.jpg", policy, "the image URL"))
    resolves_to("100.64.7.7")
    asyncio.run(check_url("http://cgnat.example/a.jpg", policy, "the image URL"))
