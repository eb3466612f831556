"""bench/connclient.c's receiver counts what each socket gets: no loss or duplicate unseen.

A stand-in server (plain sockets in this process) answers two sockets' upgrades
and subscriptions, then sends publications as the gateway frames them: to one
socket with a repeat, a gap and a ping between them; to the other all of them
in one write, split inside a frame. The receiver's report must count each
delivery, loss and duplicate, answer the ping, and say per publication how many
sockets got it. No timing is checked.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from bench import connrate
from tests.servers import UNIT

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def _frame(payload: bytes, opcode: int = 1) -> bytes:
    """A server's (unmasked) frame."""
    return bytes([0x80 | opcode, len(payload)]) + payload


def _push(seq: int) -> bytes:
    data = b'{"s":%d,"t":%.6f,"c":0}' % (seq, time.time())
    return _frame(b'{"op":"msg","ch":"room","data":' + data + b"}")


def _exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "the receiver closed the socket"
        out += chunk
    return out


def _client_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One masked frame from the client: its opcode and unmasked payload."""
    b0, b1 = _exactly(sock, 2)
    assert b1 & 0x80, "client frames are masked"
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _exactly(sock, 2))
    mask = _exactly(sock, 4)
    payload = _exactly(sock, length)
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


def test_the_receiver_counts_deliveries_losses_and_duplicates(tmp_path: Path) -> None:
    binary = connrate.client_binary()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    tokens = tmp_path / "tokens"
    tokens.write_text("token-a\ntoken-b\n")
    argv = [str(binary), "127.0.0.1", str(port), "2", "2", str(tokens), "room", "5", "5"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    conns = []
    try:
        listener.settimeout(30 * UNIT)
        for _ in range(2):
            conn, _addr = listener.accept()
            conn.settimeout(30 * UNIT)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            assert b"Authorization: Bearer token-" in head
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
            opcode, sub = _client_frame(conn)
            assert opcode == 1 and json.loads(sub) == {"op": "sub", "id": 1, "ch": "room"}
            conn.sendall(_frame(b'{"id":1,"ok":true}'))
            conns.append(conn)
        connected = json.loads(proc.stdout.readline())
        assert connected["subscribed"] == 2

        # The first socket: 0, a ping, 1, 1 again, 3 (2 is lost), 4.
        first = [_push(0), _frame(b"are you there", 9), _push(1), _push(1), _push(3), _push(4)]
        conns[0].sendall(b"".join(first))
        assert _client_frame(conns[0]) == (10, b"are you there")
        # The second: all five in one stream, cut inside the first frame.
        stream = b"".join(_push(s) for s in range(5))
        conns[1].sendall(stream[:7])
        time.sleep(0.05)
        conns[1].sendall(stream[7:])

        report = json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(30 * UNIT)
        proc.stdout.close()
        for conn in conns:
            conn.close()
        listener.close()
    assert report["deliveries"] == 9
    assert report["lost"] == 1
    assert report["duplicates"] == 1
    assert report["closed"] == 0
    assert report["other_frames"] == 0
    assert [p["n"] for p in report["pubs"]] == [2, 2, 1, 2, 2]
    assert all(p["last"] >= p["first"] >= p["t"] > 0 for p in report["pubs"])
