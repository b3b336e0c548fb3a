"""Address checks of the image URL fetcher (no traffic: refusals happen before connecting)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from shared.errors import ImageUrlError
from shared.fetch import UrlPolicy, fetch_image

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
