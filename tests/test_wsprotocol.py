"""The sans-I/O WebSocket protocol object: bytes in, messages and answers out, no event loop."""

from __future__ import annotations

import itertools
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import wsprotocol
from proto.wsframe import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, parse_header
from proto.wsprotocol import (
    MAX_CONTROL_RUN,
    MAX_PONGS,
    WebSocketProtocol,
    WSState,
    masked_frame,
    receivable,
)

MAX = 1 << 16


def raw(
    opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, mask: bytes = b"k3y!"
) -> bytes:
    """A client frame with any flags, masked with ``mask`` (b"" for an unmasked one)."""
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 1 << 16:
        head = bytes((b0, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, bit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of each unmasked frame in ``data``."""
    out = []
    while data:
        opcode, _, head, n = parse_header(data)
        out.append((opcode, data[head : head + n]))
        data = data[head + n :]
    return out


def close_of(data: bytes) -> int | None:
    """The code of the close frame in ``data``; 1005 for an empty one; None without one."""
    for opcode, payload in server_frames(data):
        if opcode == OP_CLOSE:
            return int.from_bytes(payload[:2], "big") if payload else 1005
    return None


# -- messages -----------------------------------------------------------------


def test_whole_and_fragmented_messages_with_a_ping_between_fragments():
    p = WebSocketProtocol(MAX)
    data = raw(OP_TEXT, b"one") + raw(OP_TEXT, b"t", fin=False) + raw(OP_PING, b"hi")
    data += raw(OP_CONT, b"w", fin=False) + raw(OP_CONT, b"o") + raw(OP_BINARY, b"\xff\x00")
    assert p.receive(data) == [b"one", b"two", b"\xff\x00"]
    assert server_frames(p.data_to_send()) == [(OP_PONG, b"hi")]
    assert p.data_to_send() == b"" and p.state is WSState.OPEN


def test_bytes_split_anywhere_give_the_same_messages():
    data = raw(OP_TEXT, "héllo wörld ✓".encode()) + raw(OP_BINARY, b"x" * 300)
    data += raw(OP_TEXT, "ü".encode()[:1], fin=False) + raw(OP_CONT, "ü".encode()[1:])
    for cut in range(len(data)):
        p = WebSocketProtocol(MAX)
        got = p.receive(data[:cut]) + p.receive(data[cut:])
        assert got == ["héllo wörld ✓".encode(), b"x" * 300, "ü".encode()], cut
        assert p.failure is None


def test_frames_before_a_violation_in_the_same_read_are_processed():
    p = WebSocketProtocol(MAX)
    got = p.receive(raw(OP_TEXT, b"first") + raw(OP_PING, b"p") + raw(0xB) + raw(OP_TEXT, b"never"))
    assert got == [b"first"]
    assert server_frames(p.data_to_send()) == [
        (OP_PONG, b"p"),
        (OP_CLOSE, b"\x03\xeaunknown opcode 11"),
    ]
    assert p.state is WSState.CLOSED and p.close_code == 1002
    assert p.receive(raw(OP_TEXT, b"more")) == [] and p.data_to_send() == b""


# -- control frames: a budget ---------------------------------------------------


def pings(n: int, start: int = 0) -> bytes:
    """``n`` pings, each carrying its own number."""
    return b"".join(raw(OP_PING, b"%d" % i) for i in range(start, start + n))


def test_many_pings_in_one_read_get_at_most_max_pongs_the_last_answering_the_latest():
    p = WebSocketProtocol(MAX)
    assert p.receive(pings(200)) == []  # under MAX_CONTROL_RUN
    got = server_frames(p.data_to_send())
    assert len(got) == MAX_PONGS == 16
    assert got == [(OP_PONG, b"%d" % i) for i in range(15)] + [(OP_PONG, b"199")]
    assert p.failure is None and p.state is WSState.OPEN
    # the next read starts over, and a few pings are each answered
    p.receive(raw(OP_TEXT, b"m") + pings(3, 1000))
    assert server_frames(p.data_to_send()) == [(OP_PONG, b"%d" % i) for i in range(1000, 1003)]


def test_a_thousand_pings_in_one_read_fail_with_1008_at_the_first_past_the_run():
    p = WebSocketProtocol(MAX)
    assert p.receive(pings(1000)) == []
    assert p.state is WSState.CLOSED and p.close_code == 1008
    assert p.failure is not None and "256 control or empty frames" in p.failure.reason
    got = server_frames(p.data_to_send())
    # the pings before the violation are answered (15, then the 256th), then the close
    assert got[:-1] == [(OP_PONG, b"%d" % i) for i in range(15)] + [(OP_PONG, b"255")]
    assert got[-1] == (OP_CLOSE, b"\x03\xf0over 256 control or empty frames without a message")
    assert p.receive(pings(10)) == [] and p.data_to_send() == b""


def test_a_message_after_a_run_too_long_comes_too_late():
    p = WebSocketProtocol(MAX)
    assert p.receive(pings(300) + raw(OP_TEXT, b"hello")) == []
    assert p.close_code == 1008 and close_of(p.data_to_send()) == 1008


def test_a_run_is_counted_across_reads_and_up_to_the_limit_passes():
    p = WebSocketProtocol(MAX)
    p.receive(pings(MAX_CONTROL_RUN - 1))
    p.receive(raw(OP_PONG, b"unsolicited"))  # pongs count as well
    assert p.failure is None
    p.receive(raw(OP_PING))
    assert p.close_code == 1008


def test_pings_with_messages_between_them_never_fail():
    p = WebSocketProtocol(MAX)
    data = pings(100) + raw(OP_TEXT, b"msg") + pings(100, 100)
    assert p.receive(data) == [b"msg"]
    assert p.failure is None and p.state is WSState.OPEN
    pongs = server_frames(p.data_to_send())
    assert len(pongs) == MAX_PONGS and pongs[-1] == (OP_PONG, b"199")
    for _ in range(10):  # a long life of pings and messages, in any reads
        assert p.receive(raw(OP_BINARY, b"\x00") + pings(200)) == [b"\x00"]
    assert p.failure is None


def test_a_continuation_frame_does_not_end_a_run():
    # Empty fragments cost nothing against max_size: were they to reset the run, a flood
    # of pings with one between every 255 would never end.
    p = WebSocketProtocol(MAX)
    data = raw(OP_TEXT, b"a", fin=False) + pings(200) + raw(OP_CONT, b"", fin=False) + pings(100)
    assert p.receive(data) == [] and p.close_code == 1008


def test_a_close_frame_after_a_full_run_closes_cleanly():
    p = WebSocketProtocol(MAX)
    assert p.receive(pings(MAX_CONTROL_RUN) + raw(OP_CLOSE, b"\x03\xe8")) == []
    assert p.failure is None and p.state is WSState.CLOSED and p.close_code == 1000
    got = server_frames(p.data_to_send())
    assert got[-2:] == [(OP_PONG, b"255"), (OP_CLOSE, b"\x03\xe8")]  # the pong before the close
    # and after our own close, the peer's is still taken
    q = WebSocketProtocol(MAX)
    q.receive(pings(MAX_CONTROL_RUN))
    q.close(1001)
    q.receive(raw(OP_CLOSE, b"\x03\xe9"))
    assert q.failure is None and q.state is WSState.CLOSED


def test_pongs_answering_our_pings_never_add_up():
    p = WebSocketProtocol(MAX)
    for _ in range(3 * MAX_CONTROL_RUN):  # hours of heartbeats on an idle socket
        p.ping()  # ours went out
        p.receive(raw(OP_PONG))
    for _ in range(3):  # a ping the adapter built itself, and a pause, say the same
        p.receive(raw(OP_PONG) * (MAX_CONTROL_RUN - 1))
        p.reset_control_run()
    assert p.failure is None and p.state is WSState.OPEN


def test_a_flood_of_empty_pings_fails_fast_with_bounded_output(monkeypatch):
    flood = raw(OP_PING) * ((256 << 10) // 6)  # one 256 KiB read: 43,690 pings of 6 bytes
    assert len(flood) <= 256 << 10

    def timed() -> tuple[float, WebSocketProtocol, bytes]:
        p = WebSocketProtocol(MAX)
        start = time.perf_counter()
        p.receive(flood)
        out = p.data_to_send()
        return time.perf_counter() - start, p, out

    # without the budget (what the gateway did): a pong per ping, no limit
    with monkeypatch.context() as m:
        m.setattr(wsprotocol, "MAX_CONTROL_RUN", 1 << 30)
        m.setattr(wsprotocol, "MAX_PONGS", 1 << 30)
        before, p, out = timed()
    assert p.failure is None and len(out) == 2 * len(flood) // 6
    after, p, out = timed()
    print(f"\n256 KiB of empty pings: {before * 1000:.1f} ms without the budget, "
          f"{after * 1000:.2f} ms with it ({len(out)} bytes queued)")  # fmt: skip
    assert p.state is WSState.CLOSED and p.close_code == 1008
    assert len(out) <= MAX_PONGS * 2 + 4 + len(p.close_reason.encode())
    assert close_of(out) == 1008


# -- framing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (raw(OP_TEXT, b"x", rsv=1), 1002),
        (raw(OP_PING, b"", rsv=4), 1002),
        (raw(3), 1002),
        (raw(0xF), 1002),
        (raw(OP_TEXT, b"x", mask=b""), 1002),
        (raw(OP_PING, b"x" * 126), 1002),
        (raw(OP_PING, b"x", fin=False), 1002),
        (raw(OP_CONT, b"x"), 1002),
        (raw(OP_TEXT, b"a", fin=False) + raw(OP_TEXT, b"b"), 1002),
        (raw(OP_BINARY, b"a", fin=False) + raw(OP_BINARY, b"b"), 1002),
        (raw(OP_TEXT, b"x" * (MAX + 1))[:20], 1009),
        (raw(OP_TEXT, b"x" * MAX, fin=False) + raw(OP_CONT, b"x"), 1009),
    ],
    ids=[
        "rsv-data",
        "rsv-control",
        "opcode-3",
        "opcode-15",
        "unmasked",
        "long-ping",
        "fragmented-ping",
        "lone-continuation",
        "text-in-text",
        "binary-in-binary",
        "frame-too-big-at-header",
        "message-too-big",
    ],
)
def test_framing_violations_fail_the_connection(data, code):
    p = WebSocketProtocol(MAX)
    p.receive(data)
    assert p.state is WSState.CLOSED and p.close_code == code
    assert close_of(p.data_to_send()) == code


# -- UTF-8 --------------------------------------------------------------------

INVALID = [
    b"\xff",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
]


@pytest.mark.parametrize("bad", INVALID)
def test_invalid_utf8_in_a_text_message_fails_with_1007(bad):
    p = WebSocketProtocol(MAX)
    assert p.receive(raw(OP_TEXT, bad)) == []
    assert p.close_code == 1007 and close_of(p.data_to_send()) == 1007
    # binary messages carry any bytes
    assert WebSocketProtocol(MAX).receive(raw(OP_BINARY, bad)) == [bad]


def test_invalid_utf8_fails_at_its_fragment_before_the_message_ends():
    p = WebSocketProtocol(MAX)
    p.receive(raw(OP_TEXT, "κόσμε".encode(), fin=False))
    assert p.state is WSState.OPEN
    p.receive(raw(OP_CONT, b"\xce\xba\xed\xa0\x80", fin=False))
    assert p.close_code == 1007 and p.state is WSState.CLOSED


def test_invalid_utf8_fails_inside_a_frame_before_the_frame_ends():
    frame = raw(OP_TEXT, b"valid " * 10 + b"\xf4\x90\x80\x80" + b"x" * 1000)
    p = WebSocketProtocol(MAX)
    p.receive(frame[:40])
    assert p.state is WSState.OPEN  # nothing wrong yet
    p.receive(frame[40:80])  # the bad bytes are in, the frame is not
    assert p.close_code == 1007


@pytest.mark.parametrize("start", [b"\xf4\x90", b"\xe0\x80", b"\xed\xa0", b"\xed\xbf"])
def test_a_fragment_ending_where_no_byte_can_make_it_valid_fails_there(start):
    # A surrogate's first two bytes (ED A0..ED BF) waited for the next fragment:
    # Python's incremental decoder holds them back (for its surrogatepass handler).
    p = WebSocketProtocol(MAX)
    p.receive(raw(OP_TEXT, b"ok" + start, fin=False))
    assert p.state is WSState.CLOSED and close_of(p.data_to_send()) == 1007


def test_a_character_split_across_fragments_and_reads_is_valid():
    text = "€𝄞".encode()  # 3 and 4 bytes
    frames = (
        raw(OP_TEXT, text[:2], fin=False)
        + raw(OP_CONT, text[2:5], fin=False)
        + raw(OP_CONT, text[5:])
    )
    p = WebSocketProtocol(MAX)
    got = []
    for i in range(len(frames)):
        got += p.receive(frames[i : i + 1])
    assert got == [text] and p.failure is None


def test_a_message_cut_in_the_middle_of_a_character_fails():
    p = WebSocketProtocol(MAX)
    p.receive(raw(OP_TEXT, "€".encode()[:2], fin=False) + raw(OP_CONT, b""))
    assert p.close_code == 1007


# -- closing ------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        0,
        999,
        1000,
        1001,
        1003,
        1004,
        1005,
        1006,
        1007,
        1011,
        1012,
        1014,
        1015,
        1016,
        2999,
        3000,
        4999,
        5000,
        65535,
    ],
)
def test_a_peers_close_is_answered_with_its_code_or_1002(code):
    p = WebSocketProtocol(MAX)
    p.receive(raw(OP_CLOSE, code.to_bytes(2, "big") + b"bye"))
    assert p.state is WSState.CLOSED
    sent = close_of(p.data_to_send())
    if receivable(code):
        assert (
            sent == code and p.close_code == code and p.close_reason == "bye" and p.failure is None
        )
    else:
        assert sent == 1002 and p.failure is not None


def test_close_payload_rules():
    empty = WebSocketProtocol(MAX)
    empty.receive(raw(OP_CLOSE))
    assert server_frames(empty.data_to_send()) == [(OP_CLOSE, b"")] and empty.close_code == 1005
    one = WebSocketProtocol(MAX)
    one.receive(raw(OP_CLOSE, b"\x03"))
    assert close_of(one.data_to_send()) == 1002
    bad = WebSocketProtocol(MAX)
    bad.receive(raw(OP_CLOSE, b"\x03\xe8\xce\xba\xed\xa0\x80"))
    assert close_of(bad.data_to_send()) == 1007


def test_frames_after_the_peers_close_are_ignored():
    p = WebSocketProtocol(MAX)
    assert p.receive(
        raw(OP_TEXT, b"a") + raw(OP_CLOSE, b"\x03\xe8") + raw(OP_TEXT, b"b") + raw(0xB)
    ) == [b"a"]
    assert p.failure is None and close_of(p.data_to_send()) == 1000


def test_our_close_then_theirs_then_nothing():
    p = WebSocketProtocol(MAX)
    sent = p.close(4001, "slow consumer")
    assert (
        server_frames(sent) == [(OP_CLOSE, b"\x0f\xa1slow consumer")] and p.state is WSState.CLOSING
    )
    assert p.close(1000) == b""  # once
    assert (
        p.receive(raw(OP_TEXT, b"late") + raw(OP_PING)) == []
    )  # nothing more is delivered or answered
    p.receive(raw(OP_CLOSE, b"\x0f\xa1"))
    assert p.state is WSState.CLOSED and p.data_to_send() == b""


def test_a_violation_while_closing_sends_no_second_close():
    p = WebSocketProtocol(MAX)
    p.close(1001)
    p.receive(raw(OP_TEXT, b"x", rsv=2))
    assert p.state is WSState.CLOSED and p.data_to_send() == b""


def test_a_close_reason_is_cut_between_characters():
    p = WebSocketProtocol(MAX)
    payload = server_frames(p.close(1000, "é" * 100))[0][1]
    assert len(payload) == 2 + 122 and payload[2:].decode() == "é" * 61


# -- the client side ----------------------------------------------------------


def test_the_client_side_wants_unmasked_frames_and_masks_its_own():
    c = WebSocketProtocol(MAX, client=True)
    assert c.receive(raw(OP_TEXT, b"hi", mask=b"") + raw(OP_PING, b"p", mask=b"")) == [b"hi"]
    pong = c.data_to_send()
    assert pong[1] & 0x80  # masked
    assert WebSocketProtocol(MAX).receive(pong) == []  # a server reads it as a pong
    c.receive(raw(OP_TEXT, b"masked"))
    assert c.close_code == 1002 and c.data_to_send()[1] & 0x80
    reason = WebSocketProtocol(MAX, client=True).close(1000, "ü" * 100)
    server = WebSocketProtocol(MAX)
    server.receive(reason)
    assert server.close_reason == "ü" * 61


# -- fuzzing ------------------------------------------------------------------


def feed(p: WebSocketProtocol, data: bytes, cuts: list[int]) -> list[bytes]:
    got: list[bytes] = []
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        got += p.receive(data[last:cut])
        last = cut
    return got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    client=st.booleans(),
)
def test_arbitrary_bytes_give_messages_or_a_documented_close(data, cuts, client):
    p = WebSocketProtocol(300, client=client)
    got = feed(p, data, cuts)
    if p.failure is not None:
        assert p.failure.code in (1002, 1007, 1009) and p.state is WSState.CLOSED
    assert all(len(m) <= 300 for m in got)
    # however the bytes are split, the outcome is the same
    q = WebSocketProtocol(300, client=client)
    assert q.receive(data) == got and q.close_code == p.close_code


frames = st.one_of(
    st.tuples(st.sampled_from([OP_TEXT, OP_BINARY, OP_CONT, OP_PING, OP_PONG, OP_CLOSE, 3, 0xB]),
              st.binary(max_size=140) | st.text(max_size=40).map(str.encode),
              st.booleans(), st.sampled_from([0, 0, 0, 1, 4])),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(frames, max_size=8), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_structured_frames_split_anywhere_give_one_outcome(parts, cuts):
    data = b"".join(raw(op, payload, fin=fin, rsv=rsv) for op, payload, fin, rsv in parts)
    whole = WebSocketProtocol(MAX)
    expected = whole.receive(data)
    split = WebSocketProtocol(MAX)
    assert feed(split, data, cuts) == expected
    assert (split.close_code, split.state) == (whole.close_code, whole.state)
    for message in expected:
        assert len(message) <= MAX


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(frames, max_size=8),
    cuts=st.lists(st.integers(0, 2000), max_size=4),
    budgets=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=8),
)
def test_budgets_hold_frames_back_without_changing_the_outcome(parts, cuts, budgets):
    data = b"".join(raw(op, payload, fin=fin, rsv=rsv) for op, payload, fin, rsv in parts)
    whole = WebSocketProtocol(MAX)
    expected = whole.receive(data)
    expected_out = whole.data_to_send()
    p = WebSocketProtocol(MAX)
    got: list[bytes] = []
    out = b""
    turn = 0
    for chunk in (data[a:b] for a, b in itertools.pairwise([0, *sorted(cuts), len(data)])):
        while True:
            messages, frames_ = budgets[turn % len(budgets)]
            turn += 1
            batch = p.receive(chunk, max_messages=messages, max_frames=frames_)
            assert len(batch) <= messages
            got += batch
            out += p.data_to_send()
            chunk = b""
            if not p.held:
                break
    assert got == expected
    assert (p.close_code, p.state) == (whole.close_code, whole.state)
    # the same answers (pongs, close) go out, though perhaps split across calls:
    # past MAX_PONGS in one call only the latest ping is answered, so compare closes
    assert close_of(out) == close_of(expected_out)


def test_a_fragmented_message_holds_about_its_own_size_in_memory():
    # Kept as one bytes object per fragment, 1-byte continuations held ~40 times max_size,
    # and empty ones (6 bytes on the wire, counted as 0 against max_size) grew without bound.
    def held_after(continuation: bytes, reads: int) -> tuple[int, WebSocketProtocol]:
        p = WebSocketProtocol(MAX)
        assert p.receive(raw(OP_TEXT, b"a", fin=False)) == []
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(reads):
                p.receive(continuation * 10_000)
            return tracemalloc.get_traced_memory()[0] - before, p
        finally:
            tracemalloc.stop()

    held, p = held_after(raw(OP_CONT, b"b", fin=False), 6)  # 60,000 bytes of 65,536
    assert p.failure is None and p.state is WSState.OPEN and held <= 2 * MAX, held
    assert p.receive(raw(OP_CONT, b"c")) == [b"a" + b"b" * 60_000 + b"c"]


def test_a_continuation_past_the_message_limit_is_refused_at_its_header():
    # Checked once the whole frame was in, it let a socket hold max_size of
    # fragments and nearly max_size more of a frame it never finished.
    p = WebSocketProtocol(MAX)
    assert p.receive(raw(OP_BINARY, b"a" * (MAX - 1), fin=False)) == []
    continuation = raw(OP_CONT, b"b" * 2)
    assert p.receive(continuation[:-2]) == []  # the header, and no payload
    assert p.state is WSState.CLOSED and close_of(p.data_to_send()) == 1009


def test_a_read_of_a_large_unfinished_frame_copies_only_what_came():
    # The buffered start of a frame was joined to each read and the rest copied
    # again: near the end of a 1 MiB frame a 1-byte read cost ~50 us, against ~2 us
    # at its start. Measured here as memory allocated for each such read.
    big = 1 << 20
    frame = raw(OP_BINARY, b"z" * big)
    p = WebSocketProtocol(big)
    p.receive(frame[: len(frame) - 1000])
    peaks = []
    tracemalloc.start()
    try:
        for i in range(len(frame) - 1000, len(frame) - 1):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            assert p.receive(frame[i : i + 1]) == []
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert sorted(peaks)[len(peaks) // 2] < 4096, max(peaks)
    assert p.receive(frame[-1:]) == [b"z" * big]


def test_empty_continuations_are_a_run_like_pings():
    # They cost 6 bytes each and carry nothing: unbounded, 43,000 in one 256 KiB read
    # kept the reader busy for ~90 ms. As many as a run allows still make a message.
    empty = raw(OP_CONT, b"", fin=False)
    p = WebSocketProtocol(MAX)
    first = raw(OP_TEXT, b"a", fin=False) + empty * MAX_CONTROL_RUN + raw(OP_CONT, b"z")
    assert p.receive(first) == [b"az"]
    # a complete message starts a new run: the same again passes
    assert p.receive(first + raw(OP_PING)) == [b"az"] and p.failure is None
    p = WebSocketProtocol(MAX)
    flood = raw(OP_TEXT, b"ok") + raw(OP_TEXT, b"a", fin=False) + empty * 10_000
    assert p.receive(flood + raw(OP_CONT, b"z")) == [b"ok"]  # what came before is returned
    assert p.state is WSState.CLOSED and p.close_code == 1008
    assert close_of(p.data_to_send()) == 1008
    # pings and empty continuations add up in one run
    p = WebSocketProtocol(MAX)
    p.receive(raw(OP_TEXT, b"a", fin=False) + pings(MAX_CONTROL_RUN // 2))
    p.receive(empty * (MAX_CONTROL_RUN // 2))
    assert p.failure is None
    p.receive(empty)
    assert p.close_code == 1008


# -- budgets of one receive ------------------------------------------------------


def test_max_messages_holds_back_the_rest_until_asked_in_order():
    p = WebSocketProtocol(MAX)
    data = b"".join(raw(OP_TEXT, b"m%d" % i) for i in range(5)) + raw(OP_TEXT, b"tail")
    assert p.receive(data[:-2], max_messages=2) == [b"m0", b"m1"]
    assert p.held
    assert p.receive(b"", max_messages=2) == [b"m2", b"m3"] and p.held
    # bytes that arrive while frames are held back come after them
    assert p.receive(data[-2:], max_messages=0) == [] and p.held
    assert p.receive(b"") == [b"m4", b"tail"] and not p.held
    assert p.receive(b"") == [] and not p.held
    assert p.receive(b"", max_messages=0) == [] and not p.held  # nothing to hold back
    assert p.receive(raw(OP_TEXT, b"n"), max_messages=0) == [] and p.held
    assert p.receive(b"", max_messages=1) == [b"n"] and not p.held


def test_max_frames_counts_every_frame_and_held_pings_are_answered_later():
    p = WebSocketProtocol(MAX)
    data = pings(3) + raw(OP_TEXT, b"a", fin=False) + raw(OP_CONT, b"b") + raw(OP_TEXT, b"c")
    assert p.receive(data, max_frames=2) == [] and p.held
    assert server_frames(p.data_to_send()) == [(OP_PONG, b"0"), (OP_PONG, b"1")]
    assert p.receive(b"", max_frames=3) == [b"ab"] and p.held
    assert server_frames(p.data_to_send()) == [(OP_PONG, b"2")]
    assert p.receive(b"", max_frames=3) == [b"c"] and not p.held


def test_a_partial_frame_behind_held_frames_completes_with_the_next_bytes():
    p = WebSocketProtocol(MAX)
    last = raw(OP_TEXT, "é".encode() * 100)
    data = raw(OP_TEXT, b"x") * 3 + last
    assert p.receive(data[:-50], max_messages=1) == [b"x"] and p.held
    assert p.receive(b"", max_messages=5) == [b"x", b"x"] and not p.held
    assert p.receive(data[-50:]) == ["é".encode() * 100]
    # invalid UTF-8 in a held-back frame fails when it is parsed, not before
    p = WebSocketProtocol(MAX)
    assert p.receive(raw(OP_TEXT, b"x") + raw(OP_TEXT, b"\xff"), max_messages=1) == [b"x"]
    assert p.failure is None
    assert p.receive(b"") == [] and p.close_code == 1007


def test_masked_frame_round_trips_through_the_server_side():
    p = WebSocketProtocol(MAX)
    assert p.receive(masked_frame(OP_TEXT, b"x" * 70000)) == []  # over MAX: 1009
    assert p.close_code == 1009
    q = WebSocketProtocol(1 << 20)
    assert q.receive(masked_frame(OP_BINARY, b"y" * 70000)) == [b"y" * 70000]
