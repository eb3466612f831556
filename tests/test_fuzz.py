"""Property-based fuzzing (issue 14): arbitrary bytes in, only the documented errors out.

* the frame reader of `proto.wsprotocol.WebSocketProtocol` (client frames):
  valid frames come back exactly (messages, pongs), the first invalid one
  fails the connection with the code RFC 6455 gives it (an independent model,
  `FrameSpec.error`), whatever the split; its client side (server frames, as
  the load tool reads them): only 1002, 1007 or 1009, one outcome for any
  split, and no message the bytes do not hold. (tests/test_wsprotocol.py
  fuzzes the protocol object's outcome.)
* Both codecs (`proto.codec`) and the per-connection `proto.Connection`:
  only `ProtocolError` from ``decode`` / ``receive``; a decoded ``pub``'s
  data only `InvalidData` on its way to JSON.
* End to end: a real gateway process gets random bytes on fresh sockets
  (before and after the upgrade) while a bystander stays subscribed; the
  bystander still gets publications and its pings are answered.

Example counts are kept modest so the file stays well within a minute; the
strategies live in tests/conformance/strategies.py for the protocol
object's own fuzzing.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import CODECS, Connection, InvalidData, ProtocolError, Pub
from proto.grants import Grants
from proto.wsprotocol import WebSocketProtocol, WSState
from tests.conformance.processes import ServerProcess, gateway_process
from tests.conformance.strategies import (
    FrameSpec,
    chunked,
    client_streams,
    frame_specs,
    server_streams,
)
from tests.conformance.wire import (
    accept_for,
    close_payload,
    frame,
    parse_server_frames,
    upgrade_request,
)
from tests.servers import UNIT

MAX = 256  # a small limit, so that fuzzed frames cross it
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cuts = st.lists(st.integers(0, 4096), max_size=6)


def _feed(
    data: bytes, points: list[int], client: bool = False
) -> tuple[list[bytes], int | None, bytes, WSState]:
    """What a server-side (or ``client``-side) protocol object makes of ``data`` read in pieces."""
    protocol = WebSocketProtocol(MAX, client=client)
    messages: list[bytes] = []
    out = b""
    for piece in chunked(data, points):
        messages += protocol.receive(piece)
        out += protocol.data_to_send()
    code = None if protocol.failure is None else protocol.failure.code
    assert code in (None, 1002, 1007, 1009), code
    return messages, code, out, protocol.state


def _pong(payload: bytes) -> bytes:
    return bytes((0x8A, len(payload))) + payload


# -- proto.wsprotocol: the frame reader inside the protocol object -------------
# (tests/test_wsprotocol.py fuzzes its outcome for arbitrary bytes and splits;
# here, the RFC's verdict on each frame, from an independent model.)


@FAST
@given(
    valid=st.lists(
        st.one_of(
            st.tuples(st.just(2), st.binary(max_size=MAX)),
            st.tuples(st.sampled_from((9, 10)), st.binary(max_size=125)),
        ),
        max_size=5,
    ),
    bad=frame_specs(MAX + 40).filter(lambda s: s.error(MAX) is not None),
    key=st.binary(min_size=4, max_size=4),
    points=cuts,
)
def test_protocol_object_processes_valid_frames_and_fails_the_first_invalid_one_with_the_rfc_code(
    valid: list[tuple[int, bytes]], bad: FrameSpec, key: bytes, points: list[int]
) -> None:
    data = b"".join(frame(op, payload, key=key) for op, payload in valid) + bad.encode()
    messages, code, out, state = _feed(data, points)
    assert messages == [payload for op, payload in valid if op == 2]
    assert code == bad.error(MAX), bad
    assert state is WSState.CLOSED
    pongs = b"".join(_pong(payload) for op, payload in valid if op == 9)
    assert out.startswith(pongs)
    close = parse_server_frames(out[len(pongs) :])[0]
    assert len(close) == 1 and close[0][0] == 8
    assert int.from_bytes(close[0][2][:2], "big") == code


@FAST
@given(specs=st.lists(frame_specs(MAX, valid=True), min_size=1, max_size=5), points=cuts)
def test_protocol_object_gives_one_outcome_for_any_split(
    specs: list[FrameSpec], points: list[int]
) -> None:
    data = b"".join(s.encode() for s in specs)
    assert _feed(data, points) == _feed(data, [])


# -- proto.wsprotocol, client side: server frames, as the load tool reads them ----


def _messages_in(data: bytes) -> list[bytes]:
    """The data messages an independent parse finds in ``data``, up to the first doubtful frame."""
    messages: list[bytes] = []
    parts: list[bytes] | None = None
    for opcode, fin, payload, wrong in parse_server_frames(data)[0]:
        if wrong or opcode == 8 or (opcode == 0) != (parts is not None):
            break
        if opcode in (1, 2, 0):
            parts = (parts or []) + [payload]
            if fin:
                messages.append(b"".join(parts))
                parts = None
    return messages


@FAST
@given(data=st.one_of(st.binary(max_size=600), server_streams()), points=cuts)
def test_client_side_takes_any_server_bytes_with_one_outcome_for_any_split(
    data: bytes, points: list[int]
) -> None:
    messages, code, _, state = _feed(data, points, client=True)
    whole, whole_code, _, whole_state = _feed(data, [], client=True)
    assert (messages, code, state) == (whole, whole_code, whole_state)  # (what it sends is masked)


@FAST
@given(data=server_streams())
def test_client_side_returns_only_the_messages_the_bytes_hold(data: bytes) -> None:
    messages = _feed(data, [], client=True)[0]
    assert messages == _messages_in(data)[: len(messages)]


# -- codecs and the per-connection protocol state ------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MSGPACKISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=12,
)
COMMANDS = st.fixed_dictionaries(
    {
        "op": st.sampled_from(
            [
                "sub",
                "unsub",
                "pub",
                "ping",
                "rpc",
                "refresh",
                "history",
                "presence",
                "presence_stats",
                "nope",
            ]
        )
    },
    optional={
        "id": st.integers(-5, 2**64) | MSGPACKISH,
        "ch": st.text(max_size=12) | MSGPACKISH,
        "data": MSGPACKISH,
        "since": MSGPACKISH,
        "limit": MSGPACKISH,
        "method": MSGPACKISH,
        "path": MSGPACKISH,
        "token": MSGPACKISH,
        "x": MSGPACKISH,
    },
)


def _encode_msgpack(obj: object) -> bytes:
    try:
        return msgspec.msgpack.encode(obj)
    except (OverflowError, TypeError):
        return b"\xc1"  # never-used byte: itself a decode error


def _receive_only_documented(data: bytes | str) -> None:
    grants = Grants(("room:*",), True)
    for codec in CODECS:
        conn = Connection(codec, grants, max_publish_bytes=MAX)
        try:
            cmd = conn.receive(data)
        except ProtocolError as exc:
            assert exc.code and exc.message
            continue
        if isinstance(cmd, Pub):
            try:
                codec.data_to_json(cmd.data)
            except InvalidData as exc:
                assert exc.reason


@FAST
@given(data=st.binary(max_size=300) | st.text(max_size=100))
def test_codecs_take_any_bytes(data: bytes | str) -> None:
    _receive_only_documented(data)


@FAST
@given(cmd=COMMANDS)
def test_codecs_take_any_command_shape(cmd: dict[str, object]) -> None:
    _receive_only_documented(_encode_msgpack(cmd))
    try:
        text = msgspec.json.encode(cmd)
    except (OverflowError, TypeError, ValueError):
        return
    _receive_only_documented(text)
    _receive_only_documented(text.decode())


@FAST
@given(value=JSONISH | MSGPACKISH)
def test_published_data_of_any_shape_is_carried_or_refused_as_invalid(value: object) -> None:
    _receive_only_documented(_encode_msgpack({"id": 1, "op": "pub", "ch": "room:1", "data": value}))
    try:
        data = msgspec.json.encode(value)
    except (OverflowError, TypeError, ValueError):
        return  # not JSON at all: nothing a JSON client could send
    _receive_only_documented(b'{"id":1,"op":"pub","ch":"room:1","data":' + data + b"}")


# -- end to end: a real gateway process ----------------------------------------


class _Raw:
    """A blocking raw socket speaking just enough WebSocket for the end-to-end fuzz."""

    def __init__(self, port: int, path: str, upgrade: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5 * UNIT)
        self.buffer = b""
        if upgrade:
            request, key = upgrade_request(path, f"127.0.0.1:{port}")
            self.sock.sendall(request)
            while b"\r\n\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                assert chunk, "closed during the handshake"
                self.buffer += chunk
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            assert accept_for(key).encode() in head

    def send_text(self, payload: bytes) -> None:
        self.sock.sendall(frame(1, payload))

    def messages(self, timeout: float) -> Iterator[bytes]:
        """Data messages as they arrive, until ``timeout`` passes without one."""
        while True:
            frames, used = parse_server_frames(self.buffer)
            self.buffer = self.buffer[used:]
            for opcode, _, payload, _ in frames:
                if opcode == 9:
                    self.sock.sendall(frame(10, payload))
                elif opcode in (1, 2):
                    yield payload
                elif opcode == 8:
                    return
            self.sock.settimeout(timeout)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return
            if not chunk:
                return
            self.buffer += chunk

    def request(self, payload: bytes, needle: bytes, timeout: float = 2 * UNIT) -> bytes:
        self.send_text(payload)
        for message in self.messages(timeout):
            if needle in message:
                return message
        raise AssertionError(f"no message with {needle!r}")

    def throw(self, data: bytes) -> None:
        """Write ``data`` and read whatever comes back for a moment (or the close)."""
        try:
            self.sock.sendall(data)
            self.sock.settimeout(0.15 * UNIT)
            deadline = time.monotonic() + 0.3 * UNIT
            while time.monotonic() < deadline and self.sock.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.sendall(frame(8, close_payload(1000)))
        except OSError:
            pass
        self.sock.close()


@pytest.fixture(scope="module")
def fuzzed_gateway(database_url: str) -> Iterator[tuple[ServerProcess, int, str]]:
    with gateway_process(database_url) as (proc, target):
        yield proc, target.port, target.path


@pytest.fixture(scope="module")
def bystander(fuzzed_gateway: tuple[ServerProcess, int, str]) -> Iterator[_Raw]:
    _, port, path = fuzzed_gateway
    raw = _Raw(port, path)
    reply = raw.request(b'{"id":1,"op":"sub","ch":"room:fuzz"}', b'"id":1')
    assert b'"ok":true' in reply, reply
    yield raw
    raw.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=client_streams() | st.binary(max_size=200), upgrade=st.booleans())
def test_random_bytes_on_fresh_sockets_never_stop_the_gateway(
    fuzzed_gateway: tuple[ServerProcess, int, str], bystander: _Raw, data: bytes, upgrade: bool
) -> None:
    proc, port, path = fuzzed_gateway
    bystander.sock.sendall(frame(10, b"still here"))  # heard from: never dropped as dead
    try:
        raw = _Raw(port, path, upgrade)
    except (AssertionError, OSError) as exc:
        raise AssertionError(f"the gateway refused a fresh socket: {exc}") from exc
    raw.throw(data)
    raw.sock.close()
    assert proc.alive, proc.output()[-2000:]


def test_the_bystander_is_still_served_after_the_fuzzing(
    fuzzed_gateway: tuple[ServerProcess, int, str], bystander: _Raw
) -> None:
    proc, port, path = fuzzed_gateway
    assert proc.alive, proc.output()[-2000:]
    assert b'"ok":true' in bystander.request(b'{"id":2,"op":"ping"}', b'"id":2')
    publisher = _Raw(port, path)
    try:
        reply = publisher.request(b'{"id":1,"op":"pub","ch":"room:fuzz","data":{"n":1}}', b'"id":1')
        assert b'"ok":true' in reply, reply
    finally:
        publisher.close()
    push = next((m for m in bystander.messages(2 * UNIT) if b'"room:fuzz"' in m), None)
    assert push is not None and b'"n":1' in push, push
    assert "Traceback" not in proc.output(), proc.output()[-4000:]
