"""The conformance cases, organised by Autobahn|Testsuite's groups.

Ids follow Autobahn's where a case does what Autobahn's case of that id
does (``1.1.1`` ... ``7.13.1``; its group 9 is performance, ours is
limits). Ids past Autobahn's last one in a group are ours. ``H.n`` is the
handshake, which Autobahn does not test. Groups 12 and 13 are
permessage-deflate (RFC 7692) as Autobahn groups it: compressed messages,
and the negotiation (``offer`` on a case: its ``Sec-WebSocket-Extensions``,
``agreed``: whether the server must accept it).

Every case is a script of writes (`Send`, `Pause`) on a fresh connection and
one *expected verdict*, observable on the wire and the same for every
server:

* `Replies`: each data message gets at least one data message back (the
  gateway answers every frame with a reply, an error reply for anything
  that is not a command; the reference echoes), the listed pongs come back
  with their payloads, and the connection stays open: a close with 1000
  afterwards is answered with 1000 and the TCP connection ends.
* `Closes`: the server sends a close frame with one of ``codes`` (or, with
  ``drop_ok``, simply drops TCP) within a couple of time units, after
  exactly ``before`` data messages and no unexpected pong, and the TCP
  connection ends once the client answered the close.
* `Http`: the handshake is refused with one of ``statuses``.
* `Cut`: a request dripped byte by byte is cut within ``HEADER_TIMEOUT``.

``reference`` on a case says why the reference server (`websockets`) is not
held to it: a policy of this gateway (status codes for oversized requests)
or a behaviour the RFC leaves open. Every other case is *calibrated*: the
reference must pass it (tests/test_conformance.py checks), so a failure
against the gateway is the gateway's, not the suite's.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from tests.conformance.utf8 import kuhn_sequences
from tests.conformance.wire import close_payload, deflate, frame, upgrade_request

__all__ = [
    "CASES",
    "GROUPS",
    "Case",
    "Closes",
    "Cut",
    "Http",
    "Pause",
    "Replies",
    "Send",
    "Target",
    "by_id",
    "command",
]

TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10

GROUPS: dict[str, str] = {
    "1": "framing",
    "2": "ping/pong",
    "3": "reserved bits",
    "4": "opcodes",
    "5": "fragmentation",
    "6": "UTF-8",
    "7": "close",
    "9": "limits",
    "12": "compression",
    "13": "compression negotiation",
    "H": "handshake",
}


@dataclass(frozen=True)
class Target:
    """A server under test: where it listens and the limits it was started with."""

    name: str
    host: str
    port: int
    path: str  # with the token query, when the server needs one
    max_size: int  # MAX_FRAME_BYTES / max_size
    header_timeout: float  # HEADER_TIMEOUT / open_timeout
    max_header_bytes: int


@dataclass(frozen=True)
class Send:
    """Write ``data``; with ``chop``, in pieces of that many bytes, one write each."""

    data: bytes
    chop: int | None = None
    closes: bool = False  # carries the client's close frame


@dataclass(frozen=True)
class Pause:
    units: float  # of tests.servers.UNIT


Step = Send | Pause


@dataclass(frozen=True)
class Replies:
    messages: int = 1
    pongs: tuple[bytes, ...] = ()
    quiet: bool = False  # nothing else arrives (unsolicited pongs)


@dataclass(frozen=True)
class Closes:
    codes: frozenset[int]
    before: int = 0
    pongs: tuple[bytes, ...] = ()
    drop_ok: bool = False
    fail_fast: bool = False  # the close comes before the last write is due


@dataclass(frozen=True)
class Http:
    statuses: frozenset[int]
    header: tuple[str, str] | None = None  # a header the answer must carry


@dataclass(frozen=True)
class Cut:
    pass


Expect = Replies | Closes | Http | Cut
#: (target) -> request bytes and the key they carry; None: a plain upgrade.
Request = Callable[[Target], tuple[bytes, str]]


@dataclass(frozen=True)
class Case:
    id: str
    title: str
    steps: tuple[Step, ...]
    expect: Expect
    request: Request | None = None
    with_request: bool = False  # the first Send goes out in the upgrade request's write
    reference: str | None = None  # why the reference is not held to this case
    drip: bool = False  # the request is written a byte at a time (`Cut`)
    offer: str | None = None  # Sec-WebSocket-Extensions of the request
    agreed: bool | None = None  # whether the server must accept ``offer`` (None: either)

    @property
    def group(self) -> str:
        return self.id.split(".", 1)[0]


def command(length: int | None = None, id: int = 1) -> bytes:
    """The cheapest valid command (``ping``), padded with JSON whitespace to ``length``."""
    body = b'{"id":%d,"op":"ping"}' % id
    return body if length is None else body + b" " * (length - len(body))


def _codes(*codes: int) -> frozenset[int]:
    return frozenset(codes)


PROTOCOL = _codes(1002)
HELLO = b"Hello, world!"
UNFINISHED = (
    "websockets answers a close that interrupts a fragmented message with 1002; RFC 6455 §5.4 lets "
    "control frames interleave and Autobahn 7.1.5 expects a clean 1000"
)
FAIL_FAST = (
    "websockets checks UTF-8 once the message is complete (Autobahn's non-strict result); the "
    "gateway is held to fail at the invalid fragment (issue 14: incremental validation)"
)
NOT_ECHOED = (
    "websockets fails the connection before its handler sends the echo of a message that "
    "precedes the violation (the RFC lets it: delivering it is enough); the gateway is held to "
    "reply first (issue 14)"
)


def _s(opcode: int, payload: bytes = b"", chop: int | None = None, **kw: object) -> Send:
    return Send(frame(opcode, payload, **kw), chop)  # type: ignore[arg-type]


def _close(code: int | None = 1000, reason: bytes = b"") -> Send:
    return Send(frame(CLOSE, close_payload(code, reason)), closes=True)


def _framing() -> list[Case]:
    cases: list[Case] = []
    sizes = (0, 125, 126, 127, 128, 65535, 65536, 65536)
    for i, n in enumerate(sizes, 1):
        chop = 997 if i == 8 else None
        payload = command(n) if n >= len(command()) else b""
        cases.append(
            Case(
                f"1.1.{i}",
                f"text message of {n} bytes" + (" in 997-byte chops" if chop else ""),
                (_s(TEXT, payload, chop),),
                Replies(),
            )
        )
    for i, n in enumerate(sizes, 1):
        chop = 997 if i == 8 else None
        cases.append(
            Case(
                f"1.2.{i}",
                f"binary message of {n} bytes" + (" in 997-byte chops" if chop else ""),
                (_s(BINARY, b"\xfe" * n, chop),),
                Replies(),
            )
        )
    many = b"".join(frame(TEXT, command(id=i)) for i in range(1, 11))
    cases += [
        Case("1.3.1", "ten messages in one write", (Send(many),), Replies(10)),
        Case("1.3.2", "one message written a byte at a time", (_s(TEXT, command(), 1),), Replies()),
        Case("1.3.3", "ten messages written a byte at a time", (Send(many, 1),), Replies(10)),
        Case(
            "1.3.4", "unmasked client frame", (_s(TEXT, command(), masked=False),), Closes(PROTOCOL)
        ),
        Case(
            "1.3.5",
            "64-bit length with its most significant bit set",
            (Send(frame(TEXT, length=1 << 63)[:10]),),
            Closes(_codes(1002, 1009)),
        ),
        Case(
            "1.3.6",
            "a message, then an unmasked frame, in one write: the reply comes first",
            (Send(frame(TEXT, command()) + frame(TEXT, HELLO, masked=False)),),
            Closes(PROTOCOL, before=1),
            reference=NOT_ECHOED,
        ),
    ]
    return cases


def _ping_pong() -> list[Case]:
    blob = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"
    ten = tuple(b"payload-%d" % i for i in range(10))
    return [
        Case("2.1", "ping without payload", (_s(PING),), Replies(0, (b"",))),
        Case("2.2", "ping with a text payload", (_s(PING, HELLO),), Replies(0, (HELLO,))),
        Case("2.3", "ping with a binary payload", (_s(PING, blob),), Replies(0, (blob,))),
        Case(
            "2.4", "ping with 125 bytes", (_s(PING, b"\xfe" * 125),), Replies(0, (b"\xfe" * 125,))
        ),
        Case("2.5", "ping with 126 bytes", (_s(PING, b"\xfe" * 126),), Closes(PROTOCOL)),
        Case(
            "2.6",
            "ping with 125 bytes, a byte at a time",
            (_s(PING, b"\xfe" * 125, 1),),
            Replies(0, (b"\xfe" * 125,)),
        ),
        Case("2.7", "unsolicited pong without payload", (_s(PONG),), Replies(0, quiet=True)),
        Case(
            "2.8",
            "unsolicited pong with payload",
            (_s(PONG, b"unsolicited"),),
            Replies(0, quiet=True),
        ),
        Case(
            "2.9",
            "unsolicited pong, then a ping",
            (_s(PONG, b"unsolicited"), _s(PING, b"ping payload")),
            Replies(0, (b"ping payload",), quiet=True),
        ),
        Case("2.10", "ten pings", tuple(_s(PING, p) for p in ten), Replies(0, ten)),
        Case(
            "2.11",
            "ten pings, a byte at a time",
            tuple(_s(PING, p, 1) for p in ten),
            Replies(0, ten),
        ),
        Case(
            "2.12",
            "message, ping, message in one write",
            (
                Send(
                    frame(TEXT, command(id=1))
                    + frame(PING, b"between")
                    + frame(TEXT, command(id=2))
                ),
            ),
            Replies(2, (b"between",)),
        ),
    ]


def _reserved_bits() -> list[Case]:
    first = frame(TEXT, command())
    cases = [
        Case("3.1", "text message with RSV = 1", (_s(TEXT, HELLO, rsv=1),), Closes(PROTOCOL)),
        Case(
            "3.2",
            "message, then RSV = 2 message, then ping",
            (Send(first + frame(TEXT, HELLO, rsv=2) + frame(PING)),),
            Closes(PROTOCOL, before=1),
            reference=NOT_ECHOED,
        ),
        Case(
            "3.3",
            "message, then RSV = 3 message, then ping, frame by frame",
            (Send(first), Pause(0.2), _s(TEXT, HELLO, rsv=3), Pause(0.2), _s(PING)),
            Closes(PROTOCOL, before=1),
        ),
        Case(
            "3.4",
            "message, then RSV = 4 message, then ping, a byte at a time",
            (Send(first, 1), Pause(0.2), _s(TEXT, HELLO, 1, rsv=4), _s(PING, b"", 1)),
            Closes(PROTOCOL, before=1),
        ),
        Case(
            "3.5",
            "binary message with RSV = 5",
            (_s(BINARY, b"\xff" * 8, rsv=5),),
            Closes(PROTOCOL),
        ),
        Case("3.6", "ping with RSV = 6", (_s(PING, HELLO, rsv=6),), Closes(PROTOCOL)),
        Case("3.7", "close with RSV = 7", (_s(CLOSE, rsv=7),), Closes(PROTOCOL)),
    ]
    for rsv in range(1, 8):
        cases.append(
            Case(
                f"3.8.{rsv}",
                f"text message with RSV = {rsv}",
                (_s(TEXT, command(), rsv=rsv),),
                Closes(PROTOCOL),
            )
        )
    for rsv in range(1, 8):
        cases.append(
            Case(
                f"3.9.{rsv}", f"pong with RSV = {rsv}", (_s(PONG, b"x", rsv=rsv),), Closes(PROTOCOL)
            )
        )
    cases.append(
        Case(
            "3.10",
            "continuation frame with RSV = 1",
            (_s(TEXT, b"frag", fin=False), _s(CONT, b"ment", rsv=1)),
            Closes(PROTOCOL),
        )
    )
    cases.append(
        Case(
            "3.11",
            "message, then RSV = 1 frame, in one write: the reply comes first",
            (Send(first + frame(TEXT, HELLO, rsv=1)),),
            Closes(PROTOCOL, before=1),
            reference=NOT_ECHOED,
        )
    )
    return cases


def _opcodes() -> list[Case]:
    cases: list[Case] = []
    first = frame(TEXT, command())
    for sub, opcodes in (("1", (3, 4, 5, 6, 7)), ("2", (11, 12, 13, 14, 15))):
        kind = "non-control" if sub == "1" else "control"
        a, b, c, d, e = opcodes
        cases += [
            Case(f"4.{sub}.1", f"reserved {kind} opcode {a}", (_s(a),), Closes(PROTOCOL)),
            Case(
                f"4.{sub}.2",
                f"reserved {kind} opcode {b} with payload",
                (_s(b, HELLO),),
                Closes(PROTOCOL),
            ),
            Case(
                f"4.{sub}.3",
                f"message, reserved {kind} opcode {c}, ping",
                (Send(first + frame(c) + frame(PING)),),
                Closes(PROTOCOL, before=1),
                reference=NOT_ECHOED,
            ),
            Case(
                f"4.{sub}.4",
                f"message, reserved {kind} opcode {d} with payload, ping",
                (Send(first + frame(d, HELLO) + frame(PING)),),
                Closes(PROTOCOL, before=1),
                reference=NOT_ECHOED,
            ),
            Case(
                f"4.{sub}.5",
                f"message, reserved {kind} opcode {e}, ping, a byte at a time",
                (Send(first, 1), Pause(0.2), _s(e, HELLO, 1), _s(PING, b"", 1)),
                Closes(PROTOCOL, before=1),
            ),
        ]
    return cases


def _fragmentation() -> list[Case]:
    f1, f2 = frame(TEXT, b'{"id":1,', fin=False), frame(CONT, b'"op":"ping"}')
    ping = frame(PING, b"ping payload")
    cont_fin = frame(CONT, b"non-continuation payload")
    cont_open = frame(CONT, b"non-continuation payload", fin=False)
    text = frame(TEXT, HELLO)
    p1, p2 = b"pongme 1!", b"pongme 2!"
    cases = [
        Case(
            "5.1",
            "ping in two fragments",
            (Send(frame(PING, b"fragment1", fin=False) + frame(CONT, b"fragment2")),),
            Closes(PROTOCOL),
        ),
        Case(
            "5.2",
            "pong in two fragments",
            (Send(frame(PONG, b"fragment1", fin=False) + frame(CONT, b"fragment2")),),
            Closes(PROTOCOL),
        ),
        Case("5.3", "text message in two fragments", (Send(f1 + f2),), Replies()),
        Case(
            "5.4",
            "text message in two fragments, frame by frame",
            (Send(f1), Pause(0.05), Send(f2)),
            Replies(),
        ),
        Case(
            "5.5", "text message in two fragments, a byte at a time", (Send(f1 + f2, 1),), Replies()
        ),
        Case(
            "5.6",
            "two fragments with a ping between",
            (Send(f1 + ping + f2),),
            Replies(1, (b"ping payload",)),
        ),
        Case(
            "5.7",
            "two fragments with a ping between, frame by frame",
            (Send(f1), Pause(0.05), Send(ping), Pause(0.05), Send(f2)),
            Replies(1, (b"ping payload",)),
        ),
        Case(
            "5.8",
            "two fragments with a ping between, a byte at a time",
            (Send(f1 + ping + f2, 1),),
            Replies(1, (b"ping payload",)),
        ),
        Case(
            "5.9",
            "continuation (FIN) with nothing to continue, then a message",
            (Send(cont_fin + text),),
            Closes(PROTOCOL),
        ),
        Case(
            "5.10",
            "continuation (FIN) with nothing to continue, frame by frame",
            (Send(cont_fin), Pause(0.05), Send(text)),
            Closes(PROTOCOL),
        ),
        Case(
            "5.11",
            "continuation (FIN) with nothing to continue, a byte at a time",
            (Send(cont_fin + text, 1),),
            Closes(PROTOCOL),
        ),
        Case(
            "5.12",
            "continuation (no FIN) with nothing to continue, then a message",
            (Send(cont_open + text),),
            Closes(PROTOCOL),
        ),
        Case(
            "5.13",
            "continuation (no FIN) with nothing to continue, frame by frame",
            (Send(cont_open), Pause(0.05), Send(text)),
            Closes(PROTOCOL),
        ),
        Case(
            "5.14",
            "continuation (no FIN) with nothing to continue, a byte at a time",
            (Send(cont_open + text, 1),),
            Closes(PROTOCOL),
        ),
        Case(
            "5.15",
            "a fragmented message, then a continuation with nothing to continue",
            (Send(f1 + f2 + frame(CONT, b"fragment3", fin=False) + frame(TEXT, b"fragment4")),),
            Closes(PROTOCOL, before=1),
            reference=NOT_ECHOED,
        ),
        Case(
            "5.16",
            "twice: continuation (no FIN) with nothing to continue, then a fragmented message",
            (
                Send(
                    (cont_open + frame(TEXT, b"fragment2", fin=False) + frame(CONT, b"fragment3"))
                    * 2
                ),
            ),
            Closes(PROTOCOL),
        ),
        Case(
            "5.17",
            "twice: continuation (FIN) with nothing to continue, then a fragmented message",
            (
                Send(
                    (cont_fin + frame(TEXT, b"fragment2", fin=False) + frame(CONT, b"fragment3"))
                    * 2
                ),
            ),
            Closes(PROTOCOL),
        ),
        Case(
            "5.18",
            "a text message in two fragments both with the text opcode",
            (Send(frame(TEXT, b"fragment1", fin=False) + frame(TEXT, b"fragment2")),),
            Closes(PROTOCOL),
        ),
        Case(
            "5.19",
            "five fragments with two pings between, a pause in the middle",
            (
                Send(
                    frame(TEXT, b'{"id"', fin=False)
                    + frame(CONT, b":1,", fin=False)
                    + frame(PING, p1)
                ),
                Pause(0.3),
                Send(
                    frame(CONT, b'"op"', fin=False)
                    + frame(CONT, b':"pi', fin=False)
                    + frame(PING, p2)
                    + frame(CONT, b'ng"}')
                ),
            ),
            Replies(1, (p1, p2)),
        ),
        Case(
            "5.20",
            "five fragments with two pings between, a pause in the middle, frame by frame",
            (
                Send(frame(TEXT, b'{"id"', fin=False)),
                Send(frame(CONT, b":1,", fin=False)),
                Send(frame(PING, p1)),
                Pause(0.3),
                Send(frame(CONT, b'"op"', fin=False)),
                Send(frame(CONT, b':"pi', fin=False)),
                Send(frame(PING, p2)),
                Send(frame(CONT, b'ng"}')),
            ),
            Replies(1, (p1, p2)),
        ),
        Case(
            "5.21",
            "a binary message starts inside a fragmented text message",
            (Send(f1 + frame(BINARY, b"\x00\x01")),),
            Closes(PROTOCOL),
        ),
        Case(
            "5.22",
            "a close between fragments ends the connection cleanly",
            (Send(f1), _close(1000)),
            Closes(_codes(1000)),
            reference=UNFINISHED,
        ),
        Case(
            "5.23",
            "a message of zero-length fragments",
            (Send(frame(TEXT, b"", fin=False) + frame(CONT, b"")),),
            Replies(),
        ),
        Case(
            "5.24",
            "a command in 20 one-byte fragments",
            (
                Send(
                    frame(TEXT, command()[:1], fin=False)
                    + b"".join(frame(CONT, bytes((c,)), fin=False) for c in command()[1:19])
                    + frame(CONT, command()[19:])
                ),
            ),
            Replies(),
        ),
    ]
    return cases


def _utf8() -> list[Case]:
    hello = "Hello-µ@ßöäüàá-UTF-8!!".encode()
    kosme = "κόσμε".encode()
    bad = kosme + b"\xed\xa0\x80" + b"edited"
    part1, part2, part3 = kosme, b"\xf4\x90\x80\x80", b"edited"
    invalid = _codes(1007)

    def bytewise(data: bytes) -> Send:
        last = len(data) - 1
        return Send(
            b"".join(
                frame(TEXT if i == 0 else CONT, data[i : i + 1], fin=i == last)
                for i in range(len(data))
            )
        )

    cases = [
        Case(
            "6.1.1",
            "three empty fragments",
            (Send(frame(TEXT, b"", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b"")),),
            Replies(),
        ),
        Case(
            "6.1.2",
            "empty fragments around an empty one",
            (
                Send(frame(TEXT, b"", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b"")),
                Pause(0.05),
            ),
            Replies(),
        ),
        Case(
            "6.1.3",
            "empty first and last fragments, a payload between",
            (
                Send(
                    frame(TEXT, b"", fin=False)
                    + frame(CONT, b"middle frame payload", fin=False)
                    + frame(CONT, b"")
                ),
            ),
            Replies(),
        ),
        Case("6.2.1", "valid UTF-8 in one frame", (_s(TEXT, hello),), Replies()),
        Case(
            "6.2.2",
            "valid UTF-8 in two fragments split at a code point",
            (
                Send(
                    frame(TEXT, "Hello-µ@ßöä".encode(), fin=False)
                    + frame(CONT, "üàá-UTF-8!!".encode())
                ),
            ),
            Replies(),
        ),
        Case(
            "6.2.3",
            "valid UTF-8 in one-byte fragments (splitting code points)",
            (bytewise(hello),),
            Replies(),
        ),
        Case("6.2.4", "valid Greek in one-byte fragments", (bytewise(kosme),), Replies()),
        Case(
            "6.3.1", "invalid UTF-8 (a surrogate) in one frame", (_s(TEXT, bad),), Closes(invalid)
        ),
        Case(
            "6.3.2",
            "invalid UTF-8 (a surrogate) in one-byte fragments",
            (bytewise(bad),),
            Closes(invalid),
        ),
        Case(
            "6.4.1",
            "invalid code point in the middle of three fragments: fail at that fragment",
            (
                _s(TEXT, part1, fin=False),
                Pause(0.5),
                _s(CONT, part2, fin=False),
                Pause(0.5),
                _s(CONT, part3),
            ),
            Closes(invalid, fail_fast=True),
            reference=FAIL_FAST,
        ),
        Case(
            "6.4.2",
            "invalid byte alone in the middle fragment: fail at that fragment",
            (
                _s(TEXT, part1 + b"\xf4", fin=False),
                Pause(0.5),
                _s(CONT, b"\x90", fin=False),
                Pause(0.5),
                _s(CONT, b"\x80\x80" + part3),
            ),
            Closes(invalid, fail_fast=True),
            reference=FAIL_FAST,
        ),
    ]
    whole = frame(TEXT, part1 + part2 + part3)
    cut = len(whole) - len(part2 + part3)
    cases += [
        Case(
            "6.4.3",
            "invalid code point in the middle of one frame written in three chops",
            (
                Send(whole[:cut]),
                Pause(0.5),
                Send(whole[cut : cut + 4]),
                Pause(0.5),
                Send(whole[cut + 4 :]),
            ),
            Closes(invalid),
        ),
        Case(
            "6.4.4",
            "invalid byte in the middle of one frame written in chops",
            (
                Send(whole[:cut]),
                Pause(0.5),
                Send(whole[cut : cut + 2]),
                Pause(0.5),
                Send(whole[cut + 2 :]),
            ),
            Closes(invalid),
        ),
    ]
    for n, (title, seqs) in enumerate(kuhn_sequences(), 5):
        for m, (ok, data) in enumerate(seqs, 1):
            shown = data.hex() if len(data) <= 12 else data[:12].hex() + "…"
            cases.append(
                Case(
                    f"6.{n}.{m}",
                    f"{title}: {shown}",
                    (_s(TEXT, data),),
                    Replies() if ok else Closes(invalid),
                )
            )
    return cases


def _close_cases() -> list[Case]:
    normal = _codes(1000)
    kosme_bad = "κόσμε".encode() + b"\xed\xa0\x80edited"
    cases = [
        Case(
            "7.1.1",
            "a message, its reply, then a close",
            (Send(frame(TEXT, command())), Pause(0.3), _close()),
            Closes(normal, before=1),
        ),
        Case("7.1.2", "two closes", (_close(), _s(CLOSE)), Closes(normal)),
        Case("7.1.3", "a ping after the close", (_close(), _s(PING, b"after")), Closes(normal)),
        Case("7.1.4", "a message after the close", (_close(), _s(TEXT, command())), Closes(normal)),
        Case(
            "7.1.5",
            "a fragment, the close, the last fragment",
            (_s(TEXT, b'{"id":1,', fin=False), _close(), _s(CONT, b'"op":"ping"}')),
            Closes(normal),
            reference=UNFINISHED,
        ),
        Case("7.3.1", "close without payload", (_close(None),), Closes(_codes(1000, 1005))),
        Case(
            "7.3.2",
            "close with a one-byte payload",
            (Send(frame(CLOSE, b"a"), closes=True),),
            Closes(PROTOCOL, drop_ok=True),
        ),
        Case("7.3.3", "close with a code", (_close(1000),), Closes(normal)),
        Case(
            "7.3.4",
            "close with a code and a reason",
            (_close(1000, b"Hello World!"),),
            Closes(normal),
        ),
        Case(
            "7.3.5", "close with a reason of 123 bytes", (_close(1000, b"*" * 123),), Closes(normal)
        ),
        Case(
            "7.3.6",
            "close with a reason of 124 bytes (a 126-byte control frame)",
            (_close(1000, b"*" * 124),),
            Closes(PROTOCOL, drop_ok=True),
        ),
        Case(
            "7.5.1",
            "close reason that is not UTF-8 (a surrogate)",
            (_close(1000, kosme_bad),),
            Closes(_codes(1002, 1007), drop_ok=True),
        ),
        Case(
            "7.5.2",
            "close reason that ends inside a character",
            (_close(1000, b"ok \xce"),),
            Closes(_codes(1002, 1007), drop_ok=True),
        ),
        Case(
            "7.5.3",
            "close reason with an overlong encoding",
            (_close(1000, b"\xc0\xaf"),),
            Closes(_codes(1002, 1007), drop_ok=True),
        ),
        Case(
            "7.1.7",
            "a message and a close in one write: the reply comes before the close",
            (Send(frame(TEXT, command()) + frame(CLOSE, close_payload(1000)), closes=True),),
            Closes(normal, before=1),
            reference=NOT_ECHOED,
        ),
    ]
    valid = (
        1000,
        1001,
        1002,
        1003,
        1007,
        1008,
        1009,
        1010,
        1011,
        3000,
        3999,
        4000,
        4999,
        1012,
        1013,
        1014,
    )
    for i, code in enumerate(valid, 1):
        cases.append(
            Case(
                f"7.7.{i}",
                f"close with valid code {code}",
                (_close(code),),
                Closes(_codes(1000, code)),
            )
        )
    invalid = (0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 1015)
    for i, code in enumerate(invalid, 1):
        cases.append(
            Case(
                f"7.9.{i}",
                f"close with invalid code {code}",
                (_close(code),),
                Closes(PROTOCOL, drop_ok=True),
            )
        )
    for i, code in enumerate((5000, 65535), 1):
        cases.append(
            Case(
                f"7.13.{i}",
                f"close with code {code}, outside every range",
                (_close(code),),
                Closes(_codes(1000, 1002), drop_ok=True),
            )
        )
    return cases


def _split(data: bytes) -> tuple[Step, ...]:
    """A frame's header and first bytes, then (after a pause) the rest.

    The rest is not written once the server has closed, as Autobahn's client
    does: the verdict is on the refusal at the header (9.7 sends it all).
    """
    return Send(data[:1024]), Pause(0.5), Send(data[1024:])


def _limits(max_size: int) -> list[Case]:
    big = _codes(1009)
    half = max_size // 2
    quarter = max_size // 4
    exact = command(max_size)
    return [
        Case(
            "9.1",
            "text frame of MAX_FRAME_BYTES + 1, its payload following its header",
            _split(frame(TEXT, b"*" * (max_size + 1))),
            Closes(big),
        ),
        Case(
            "9.2",
            "binary frame of MAX_FRAME_BYTES + 1, its payload following its header",
            _split(frame(BINARY, b"\xfe" * (max_size + 1))),
            Closes(big),
        ),
        Case(
            "9.3",
            "two fragments adding up to MAX_FRAME_BYTES + 1",
            (
                Send(
                    frame(TEXT, b"*" * half, fin=False) + frame(CONT, b"*" * (max_size + 1 - half))
                ),
            ),
            Closes(big),
        ),
        Case(
            "9.4",
            "four fragments adding up to MAX_FRAME_BYTES",
            (
                Send(
                    b"".join(
                        frame(
                            TEXT if i == 0 else CONT,
                            exact[i * quarter : (i + 1) * quarter],
                            fin=i == 3,
                        )
                        for i in range(4)
                    )
                ),
            ),
            Replies(),
        ),
        Case(
            "9.5",
            "a header announcing 4 GiB, refused before its payload",
            (Send(frame(BINARY, length=1 << 32)[:14]),),
            Closes(big),
        ),
        Case(
            "9.6",
            "a frame of exactly MAX_FRAME_BYTES, then one more byte in a continuation",
            (Send(frame(TEXT, b"*" * max_size, fin=False) + frame(CONT, b"*")),),
            Closes(big),
        ),
        Case(
            "9.7",
            "text frame of MAX_FRAME_BYTES + 1 in one write: refused, the rest discarded",
            (Send(frame(TEXT, b"*" * (max_size + 1))),),
            Closes(big),
        ),
    ]


def _request(**kw: object) -> Request:
    def build(target: Target) -> tuple[bytes, str]:
        return upgrade_request(target.path, f"{target.host}:{target.port}", **kw)  # type: ignore[arg-type]

    return build


def _oversized_line(target: Target) -> tuple[bytes, str]:
    path = (
        target.path
        + ("&" if "?" in target.path else "?")
        + "pad="
        + "x" * (target.max_header_bytes + 16)
    )
    return upgrade_request(path, f"{target.host}:{target.port}")


def _oversized_headers(target: Target) -> tuple[bytes, str]:
    pad = tuple((f"X-Pad-{i}", "y" * 1000) for i in range(target.max_header_bytes // 1000 + 2))
    return upgrade_request(target.path, f"{target.host}:{target.port}", extra=pad)


POLICY = "policy: which status answers an oversized request is this gateway's choice"


def _handshake() -> list[Case]:
    ping = frame(TEXT, command())
    return [
        Case(
            "H.1", "a valid upgrade; Sec-WebSocket-Accept matches the key", (Send(ping),), Replies()
        ),
        Case(
            "H.2",
            "Upgrade and Connection headers in other cases and lists",
            (Send(ping),),
            Replies(),
            request=_request(upgrade="WebSocket", connection="keep-alive, Upgrade"),
        ),
        Case(
            "H.3",
            "Sec-WebSocket-Key of 24 characters that are not base64",
            (),
            Http(_codes(400)),
            request=_request(key="!!!!!!!!!!!!!!!!!!!!!!!!"),
        ),
        Case(
            "H.4",
            "Sec-WebSocket-Key of 24 base64 characters decoding to 18 bytes, not 16",
            (),
            Http(_codes(400)),
            request=_request(key="AAAAAAAAAAAAAAAAAAAAAAAA"),
        ),
        Case("H.5", "no Sec-WebSocket-Key", (), Http(_codes(400)), request=_request(key="")),
        Case(
            "H.6",
            "an HTTP/1.0 upgrade request",
            (),
            Http(_codes(400, 426, 505)),
            request=_request(http="HTTP/1.0"),
        ),
        Case(
            "H.7",
            "no Sec-WebSocket-Version",
            (),
            Http(_codes(400, 426)),
            request=_request(version=None),
        ),
        Case(
            "H.8",
            "Sec-WebSocket-Version 8: refused naming version 13",
            (),
            Http(_codes(400, 426), ("sec-websocket-version", "13")),
            request=_request(version="8"),
            reference="websockets answers 400 without Sec-WebSocket-Version (RFC 6455 §4.2.2 requires it)",
        ),
        Case(
            "H.9", "no Upgrade header", (), Http(_codes(400, 426)), request=_request(upgrade=None)
        ),
        Case(
            "H.10",
            "Connection header without upgrade",
            (),
            Http(_codes(400, 426)),
            request=_request(connection="keep-alive"),
        ),
        Case(
            "H.11",
            "POST instead of GET",
            (),
            Http(_codes(400, 405)),
            request=_request(method="POST"),
        ),
        Case(
            "H.12",
            "no Host header",
            (),
            Http(_codes(400)),
            request=_request(omit_host=True),
            reference="websockets accepts an upgrade without Host (RFC 6455 §4.2.1 requires one: 400)",
        ),
        Case(
            "H.13",
            "request line over MAX_HEADER_BYTES",
            (),
            Http(_codes(414)),
            request=_oversized_line,
        ),
        Case(
            "H.14",
            "headers over MAX_HEADER_BYTES",
            (),
            Http(_codes(431)),
            request=_oversized_headers,
            reference=POLICY,
        ),
        Case(
            "H.15",
            "an upgrade dripped a byte at a time is cut within HEADER_TIMEOUT",
            (),
            Cut(),
            drip=True,
        ),
        Case(
            "H.16",
            "a message in the same write as the upgrade request is processed",
            (Send(ping),),
            Replies(1),
            with_request=True,
        ),
        Case(
            "H.17",
            "a ping in the same write as the upgrade request is answered",
            (Send(frame(PING, b"early") + ping),),
            Replies(1, (b"early",)),
            with_request=True,
            reference="websockets drops a ping that arrives before its handshake completed (no pong)",
        ),
    ]


CHROME = "permessage-deflate; client_max_window_bits"
NO_CLIENT_CONTEXT = (
    "websockets does not answer client_no_context_takeover, so its clients may keep their "
    "context between messages: the case does not apply to it"
)


def _z(opcode: int, data: bytes, chop: int | None = None, **kw: object) -> Send:
    """A compressed message in one frame (RSV1), compressed on its own."""
    return _s(opcode, deflate(data), chop, rsv=4, **kw)


def _compressed(
    id: str, title: str, steps: tuple[Step, ...], expect: Expect, reference: str | None = None
) -> Case:
    """A case on a connection that offered what Chromium offers, which must be accepted."""
    return Case(id, title, steps, expect, offer=CHROME, agreed=True, reference=reference)


def _compression(max_size: int) -> list[Case]:
    cases: list[Case] = []
    for i, n in enumerate((32, 125, 1024, 4096, 16384, 65535, max_size), 1):
        cases.append(
            _compressed(
                f"12.1.{i}",
                f"compressed text message of {n} bytes",
                (_z(TEXT, command(n)),),
                Replies(),
            )
        )
    for i, n in enumerate((128, 4096, max_size), 1):
        cases.append(
            _compressed(
                f"12.2.{i}",
                f"compressed binary message of {n} bytes",
                (_z(BINARY, b"\xfe" * n),),
                Replies(),
            )
        )
    z = deflate(command(300))
    f1 = frame(TEXT, z[:7], fin=False, rsv=4)
    f2 = frame(CONT, z[7:])
    ping = frame(PING, b"between")
    ten = b"".join(frame(TEXT, deflate(command(200, id=i)), rsv=4) for i in range(1, 11))
    one_byte = b"".join(
        frame(TEXT if i == 0 else CONT, z[i : i + 1], fin=i == len(z) - 1, rsv=4 if i == 0 else 0)
        for i in range(len(z))
    )
    cases += [
        _compressed("12.3.1", "compressed message in two fragments", (Send(f1 + f2),), Replies()),
        _compressed(
            "12.3.2",
            "compressed message in two fragments, frame by frame",
            (Send(f1), Pause(0.05), Send(f2)),
            Replies(),
        ),
        _compressed(
            "12.3.3",
            "compressed message in two fragments, a byte at a time",
            (Send(f1 + f2, 1),),
            Replies(),
        ),
        _compressed(
            "12.3.4",
            "compressed fragments with a ping between",
            (Send(f1 + ping + f2),),
            Replies(1, (b"between",)),
        ),
        _compressed(
            "12.3.5", "compressed message in one-byte fragments", (Send(one_byte),), Replies()
        ),
        _compressed(
            "12.4.1",
            "a plain message on a compressing connection",
            (_s(TEXT, command(300)),),
            Replies(),
        ),
        _compressed(
            "12.4.2",
            "ten compressed messages in one write; the server's compressed replies inflate as "
            "its answer says (each on its own after server_no_context_takeover)",
            (Send(ten),),
            Replies(10),
        ),
        _compressed(
            "12.4.3",
            "compressed, plain, compressed",
            (_z(TEXT, command(400, 1)), _s(TEXT, command(400, 2)), _z(TEXT, command(400, 3))),
            Replies(3),
        ),
        _compressed(
            "12.4.4",
            "an empty message compressed as one 0x00 byte (RFC 7692 §7.2.3.6)",
            (_s(BINARY, b"\x00", rsv=4),),
            Replies(),
        ),
        _compressed(
            "12.5.1",
            "RSV1 on a continuation frame",
            (Send(f1 + frame(CONT, z[7:], rsv=4)),),
            Closes(PROTOCOL),
        ),
        _compressed("12.5.2", "RSV1 on a ping", (_s(PING, b"x", rsv=4),), Closes(PROTOCOL)),
        _compressed(
            "12.5.3",
            "RSV1 on a close",
            (_s(CLOSE, close_payload(1000), rsv=4),),
            Closes(PROTOCOL, drop_ok=True),
        ),
        _compressed(
            "12.5.4",
            "RSV2 on a compressed message",
            (_s(TEXT, deflate(command()), rsv=6),),
            Closes(PROTOCOL),
        ),
        _compressed(
            "12.5.5",
            "a compressed message that is not deflate",
            (_s(TEXT, b"\xff\xff\xff\xff", rsv=4),),
            Closes(PROTOCOL),
        ),
        _compressed(
            "12.5.6",
            "a compressed text message that is not UTF-8 once inflated",
            (_z(TEXT, b"\xed\xa0\x80 " * 50),),
            Closes(_codes(1007)),
        ),
        _compressed(
            "12.5.7",
            "a message, then data that is not deflate, in one write: the reply comes first",
            (Send(frame(TEXT, command()) + frame(TEXT, b"\xff\xff\xff\xff", rsv=4)),),
            Closes(PROTOCOL, before=1),
            reference=NOT_ECHOED,
        ),
        Case(
            "12.5.8",
            "RSV1 on a real compressed message, the extension not offered",
            (_z(TEXT, command(300)),),
            Closes(PROTOCOL),
        ),
        _compressed(
            "12.6.1",
            "the second message refers back into the first (the client kept its context "
            "after client_no_context_takeover)",
            (Send(_takeover_pair()),),
            Closes(PROTOCOL, before=1),
            reference=NO_CLIENT_CONTEXT,
        ),
        _compressed(
            "12.7.1",
            "a compressed message of MAX_FRAME_BYTES + 1 once inflated",
            (_z(TEXT, b" " * (max_size + 1)),),
            Closes(_codes(1009)),
        ),
        _compressed(
            "12.7.2",
            "a decompression bomb: 32 KiB compressed, 32 MiB inflated",
            (_z(BINARY, b"\x00" * (32 << 20)),),
            Closes(_codes(1009)),
        ),
        _compressed(
            "12.7.3",
            "a fragmented decompression bomb, every fragment small",
            (Send(_fragments(deflate(b"\x00" * (16 << 20)), 4096)),),
            Closes(_codes(1009)),
        ),
        _compressed(
            "12.7.4",
            "a compressed frame of MAX_FRAME_BYTES + 1 (incompressible), refused at its header",
            _split(frame(BINARY, os.urandom(max_size + 1), rsv=4)),
            Closes(_codes(1009)),
        ),
    ]
    return cases


def _takeover_pair() -> bytes:
    """Two messages compressed in one stream: the second refers back into the first."""
    z = zlib.compressobj(9, zlib.DEFLATED, -9)
    body = command(200)
    one = z.compress(body) + z.flush(zlib.Z_SYNC_FLUSH)
    two = z.compress(body) + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(two) < 20  # nothing but a reference into the first
    return frame(TEXT, one[:-4], rsv=4) + frame(TEXT, two[:-4], rsv=4)


def _fragments(data: bytes, size: int) -> bytes:
    """``data`` as one compressed binary message in fragments of ``size`` bytes."""
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(
        frame(BINARY if i == 0 else CONT, part, fin=i == len(parts) - 1, rsv=4 if i == 0 else 0)
        for i, part in enumerate(parts)
    )


_ACCEPTED = (
    ("permessage-deflate", "the bare offer (Firefox, Safari)"),
    (CHROME, "client_max_window_bits without a value (Chromium, websockets)"),
    ("permessage-deflate; client_no_context_takeover", "client_no_context_takeover"),
    ("permessage-deflate; server_no_context_takeover", "server_no_context_takeover"),
    (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "both no_context_takeover",
    ),
    ("permessage-deflate; server_max_window_bits=9", "server_max_window_bits=9"),
    ("permessage-deflate; client_max_window_bits=9", "client_max_window_bits=9"),
    (
        "permessage-deflate; server_max_window_bits=15; client_max_window_bits=15",
        "both windows at 15",
    ),
    ('permessage-deflate; client_max_window_bits="10"', "a quoted value"),
    ("permessage-deflate; x_unknown=1, permessage-deflate", "a bad offer, then a good one"),
)
_DECLINED = (
    ("permessage-deflate; x_unknown", "an unknown parameter"),
    ("permessage-deflate; server_max_window_bits=16", "server_max_window_bits=16"),
    ("permessage-deflate; server_max_window_bits=7", "server_max_window_bits=7"),
    ("permessage-deflate; server_max_window_bits", "server_max_window_bits without a value"),
    (
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "a repeated parameter",
    ),
    ("permessage-deflate; server_no_context_takeover=1", "a value on a flag"),
    ("x-webkit-deflate-frame", "another extension only"),
)


def _negotiation() -> list[Case]:
    big = command(4096)  # over a 512-byte window: its compressed reply must respect it
    cases = [
        Case(
            f"13.{i}",
            f"offer accepted: {title}",
            (_z(TEXT, big),),
            Replies(),
            offer=offer,
            agreed=True,
        )
        for i, (offer, title) in enumerate(_ACCEPTED, 1)
    ]
    cases += [
        Case(
            f"13.{i}",
            f"offer declined, the socket still opens: {title}",
            (_s(TEXT, big),),
            Replies(),
            offer=offer,
            agreed=False,
        )
        for i, (offer, title) in enumerate(_DECLINED, len(cases) + 1)
    ]
    cases.append(
        Case(
            f"13.{len(cases) + 1}",
            "RSV1 after a declined offer",
            (_z(TEXT, big),),
            Closes(PROTOCOL),
            offer=_DECLINED[0][0],
            agreed=False,
        )
    )
    return cases


def build_cases(max_size: int = 65536) -> list[Case]:
    """Every case, for servers whose largest message is ``max_size`` bytes."""
    cases = (
        _framing()
        + _ping_pong()
        + _reserved_bits()
        + _opcodes()
        + _fragmentation()
        + _utf8()
        + _close_cases()
        + _limits(max_size)
        + _compression(max_size)
        + _negotiation()
        + _handshake()
    )
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids are unique"
    return cases


#: The cases for the default MAX_FRAME_BYTES (64 KiB), which both servers are started with.
CASES: list[Case] = build_cases()


def by_id(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)
