"""The PROXY protocol header (v1 text, v2 binary), as an AWS NLB sends it (``PROXY_PROTOCOL``).

A load balancer that passes TCP through writes one header before the
client's bytes, naming the client's address:

* v1: ``PROXY TCP4 203.0.113.7 10.0.0.5 51234 80\\r\\n`` (at most 107 bytes);
* v2: a 12-byte signature, version and command, family, a length, then the
  addresses (and TLVs, skipped).

`read_proxy_header` reads it from a Tornado stream and returns the source
address, or None when the header names none (v1 ``UNKNOWN``, v2 ``LOCAL``:
the balancer's own health checks) or there is no header (a probe that
reached the pod directly). A malformed header is a `ProxyHeaderError`.
The header is optional because it is believed only from a trusted proxy
(the listener's decision, ``TRUSTED_PROXIES``), and a balancer always
writes its own before anything a client sends: a client's forged header
arrives after it, where it is a malformed HTTP request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from functools import partial

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError

__all__ = ["V2_SIGNATURE", "ProxyHeaderError", "parse_v1", "parse_v2", "read_proxy_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107
#: TLVs (AWS puts the VPC endpoint id there) are read and ignored, up to this.
_V2_MAX_BODY = 4096


class ProxyHeaderError(ValueError):
    """The connection did not start with a well-formed PROXY protocol header."""


def parse_v1(line: bytes) -> str | None:
    """The source address of a v1 header line (with its CRLF), None for ``UNKNOWN``."""
    parts = line.removesuffix(b"\r\n").split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 header")
    if parts[1] == b"UNKNOWN":
        return None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 header")
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("bad source address in PROXY v1 header") from None
    if (source.version == 4) != (parts[1] == b"TCP4"):
        raise ProxyHeaderError("PROXY v1 address family mismatch")
    return str(source)


def parse_v2(head: bytes, body: bytes) -> str | None:
    """The source address of a v2 header (16-byte ``head``, then ``body``), None for ``LOCAL``."""
    if head[:12] != V2_SIGNATURE or head[12] >> 4 != 2:
        raise ProxyHeaderError("malformed PROXY v2 header")
    command, family = head[12] & 0x0F, head[13] >> 4
    if command == 0:  # LOCAL
        return None
    if command != 1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    if family == 1 and len(body) >= 12:
        return str(ipaddress.IPv4Address(body[:4]))
    if family == 2 and len(body) >= 36:
        address = ipaddress.IPv6Address(body[:16])
        return str(address.ipv4_mapped or address)
    if family in (1, 2):
        raise ProxyHeaderError("short PROXY v2 address block")
    return None  # UNSPEC or a Unix socket: no IP to take


def _set_once(ready: asyncio.Future[None], fd: object, events: int) -> None:
    if not ready.done():
        ready.set_result(None)


async def _peek(stream: IOStream, size: int) -> bytes:
    """Up to ``size`` bytes at the start of ``stream``, left unread (``MSG_PEEK``)."""
    loop = IOLoop.current()
    sock = stream.socket
    assert sock is not None
    while True:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop.add_handler(sock.fileno(), partial(_set_once, ready), IOLoop.READ)
        try:
            await ready
        finally:
            loop.remove_handler(sock.fileno())
        try:
            data = sock.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError:
            raise StreamClosedError() from None
        if not data:
            raise StreamClosedError()
        if len(data) >= size or not (b"PROXY".startswith(data) or V2_SIGNATURE.startswith(data)):
            return data
        await asyncio.sleep(0.01)  # part of a signature: wait for the rest


async def read_proxy_header(stream: IOStream) -> str | None:
    """Read the header at the start of ``stream``; its source address or None.

    A stream that does not start with one is left untouched (None): it is
    served as from its TCP peer, as the kubelet's probes must be.
    """
    first = await _peek(stream, 5)
    if first not in (b"PROXY", V2_SIGNATURE[:5]):
        return None
    first = await stream.read_bytes(5)
    if first == b"PROXY":
        line = first + await stream.read_until(b"\r\n", max_bytes=_V1_MAX - 5)
        return parse_v1(line)
    if first == V2_SIGNATURE[:5]:
        head = first + await stream.read_bytes(11)
        length = int.from_bytes(head[14:16], "big")
        if length > _V2_MAX_BODY:
            raise ProxyHeaderError("PROXY v2 header too long")
        body = await stream.read_bytes(length) if length else b""
        return parse_v2(head, body)
    raise AssertionError("unreachable: the peeked prefix was a signature")
