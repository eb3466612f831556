"""The client's IP address behind trusted proxies (``TRUSTED_PROXIES``).

A forwarding header is believed only when the TCP peer is a trusted proxy,
and only as far as it was written by trusted proxies: the list is read from
the right (the hop nearest to us) and the first address that is not a trusted
proxy is the client. Whatever a client writes itself sits to the left of what
its proxy appends, so it is never reached. A hop that is not an IP address
(``unknown``, an obfuscated ``_name``) ends the walk at the last trusted hop.

Only one header is read (``FORWARDED_HEADER``): a proxy that sets
``X-Forwarded-For`` passes a client's own ``Forwarded`` through untouched,
so reading both would let the client choose.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Protocol

__all__ = ["HeaderLists", "TrustedProxies", "address_key", "limit_key", "parse_ip"]

#: Addresses, and trusted peers' forwarding headers, whose outcome is remembered.
_REMEMBERED = 4096
#: The longest forwarding header remembered (a few hops): a client behind a trusted
#: proxy can make its header as long as the proxy lets it, and each one different.
_REMEMBERED_HEADER = 256

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(raw: str) -> _Address | None:
    """An address from a header hop (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``"[::1]"``)."""
    text = raw.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def limit_key(ip: str) -> str:
    """The key per-address limits count ``ip`` under: an IPv6 address by its /64.

    One host is routinely given a whole /64, so counting each IPv6 address
    alone would give it 2**64 allowances.
    """
    return ip if ":" not in ip else _v6_key(ip)


@functools.lru_cache(maxsize=_REMEMBERED)
def _v6_key(ip: str) -> str:
    """`limit_key` of an IPv6 address, remembered: building its network took 10 us, paid
    for each request behind a trusted proxy (whom each answer serves) since the sixteenth
    session."""
    try:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    except ValueError:
        return ip


def address_key(address: object) -> str:
    """`limit_key` of a socket address (its first item the IP) or of an IP; "" for none."""
    ip = address[0] if isinstance(address, tuple) and address else address
    return limit_key(str(ip)) if ip else ""


class HeaderLists(Protocol):
    """A request's header fields, each name's values as a list (Tornado's `HTTPHeaders`)."""

    def get_list(self, name: str) -> list[str]: ...


class TrustedProxies:
    """Resolves the client IP of a request from its TCP peer and forwarding header."""

    def __init__(self, cidrs: Iterable[str], header: str = "x-forwarded-for") -> None:
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )
        self.header = header
        self._trusts_text = functools.lru_cache(maxsize=_REMEMBERED)(self._trusts_text_uncached)
        self._resolved = functools.lru_cache(maxsize=_REMEMBERED)(self._resolved_uncached)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str | _Address | None) -> bool:
        if not self.networks:
            return False  # no address to parse: nothing is trusted
        if isinstance(ip, str):
            return self._trusts_text(ip)
        return ip is not None and any(ip in net for net in self.networks)

    def client_ip(self, peer: str, headers: HeaderLists) -> str:
        """The client's address: ``peer`` unless ``peer`` is a trusted proxy that forwarded one.

        Both steps are remembered (`_REMEMBERED` of each, least recently used
        out first): Python's address parsing cost 30 us a request behind a
        gateway. Only a trusted peer's headers are, and only short ones: that
        memory holds at most `_REMEMBERED` times `_REMEMBERED_HEADER` characters,
        whatever the clients behind the proxy write.
        """
        if not self.networks or not self.trusts(peer):
            return peer
        name = "Forwarded" if self.header == "forwarded" else "X-Forwarded-For"
        forwarded = ",".join(headers.get_list(name))
        if len(forwarded) > _REMEMBERED_HEADER:
            return self._resolved_uncached(peer, forwarded)
        return self._resolved(peer, forwarded)

    def _trusts_text_uncached(self, ip: str) -> bool:
        return self.trusts(parse_ip(ip))

    def _resolved_uncached(self, peer: str, forwarded: str) -> str:
        client = peer
        for hop in reversed(self._hops(forwarded)):
            address = parse_ip(hop)
            if address is None:
                break
            client = str(address)
            if not self.trusts(address):
                break
        return client

    def _hops(self, forwarded: str) -> list[str]:
        """The addresses a forwarding header's text names, nearest last."""
        if self.header == "forwarded":
            hops = []
            for element in forwarded.split(","):
                fors = [
                    pair.partition("=")[2]
                    for pair in element.split(";")
                    if pair.strip().lower().startswith("for=")
                ]
                hops.append(fors[0] if fors else "")
            return hops
        return forwarded.split(",")
