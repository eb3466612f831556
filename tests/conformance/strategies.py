"""Hypothesis strategies for what a client can send, and the RFC's verdict on each frame.

Used by tests/test_fuzz.py; reusable for the sans-I/O protocol object
(proto/wsprotocol.py, fuzzed in tests/test_wsprotocol.py): `client_streams`
for bytes, `chunked` for the reads they arrive in:

    @given(stream=client_streams(), cuts=st.lists(st.integers(0, 1 << 16)))
    def test_protocol_object(stream, cuts):
        protocol = WebSocketProtocol(MAX)
        for piece in chunked(stream, cuts):
            protocol.receive(piece)   # only the documented failures may come out
        # and the outcome must not depend on ``cuts``

`FrameSpec.error(max_size)` is the close code RFC 6455 requires for one
frame on its own (None when the frame is acceptable); stream-level rules
(fragmentation, UTF-8, close codes) are left to the object under test.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.conformance.wire import frame

__all__ = ["FrameSpec", "chunked", "client_streams", "frame_specs", "server_streams"]

_KNOWN = frozenset({0, 1, 2, 8, 9, 10})


@dataclass(frozen=True)
class FrameSpec:
    opcode: int
    fin: bool
    rsv: int
    masked: bool
    payload: bytes
    key: bytes
    wide: int  # 0 minimal length form, 1 16-bit, 2 64-bit

    def encode(self) -> bytes:
        return frame(
            self.opcode,
            self.payload,
            fin=self.fin,
            rsv=self.rsv,
            masked=self.masked,
            key=self.key,
            wide=self.wide,
        )

    def error(self, max_size: int) -> int | None:
        """The close code this frame alone calls for, in the order a header is read."""
        if self.rsv or self.opcode not in _KNOWN or not self.masked:
            return 1002
        if self.opcode >= 8 and (len(self.payload) > 125 or not self.fin):
            return 1002
        if len(self.payload) > max_size:
            return 1009
        return None


def frame_specs(max_payload: int = 300, valid: bool = False) -> st.SearchStrategy[FrameSpec]:
    """Client frames; with ``valid``, only frames that `FrameSpec.error` accepts (small limits)."""
    if valid:
        data = st.one_of(
            st.builds(
                FrameSpec,
                st.sampled_from((0, 1, 2)),
                st.booleans(),
                st.just(0),
                st.just(True),
                st.binary(max_size=max_payload),
                st.binary(min_size=4, max_size=4),
                st.integers(0, 2),
            ),
            st.builds(
                FrameSpec,
                st.sampled_from((8, 9, 10)),
                st.just(True),
                st.just(0),
                st.just(True),
                st.binary(max_size=125),
                st.binary(min_size=4, max_size=4),
                st.integers(0, 2),
            ),
        )
        return data
    return st.builds(
        FrameSpec,
        st.integers(0, 15),
        st.booleans(),
        st.one_of(st.just(0), st.integers(0, 7)),
        st.booleans() | st.just(True),
        st.binary(max_size=max_payload),
        st.binary(min_size=4, max_size=4),
        st.integers(0, 2),
    )


@st.composite
def client_streams(draw: st.DrawFn, max_frames: int = 8) -> bytes:
    """Bytes a client might write: frames valid and not, raw bytes, truncations."""
    parts = draw(
        st.lists(
            st.one_of(
                frame_specs().map(FrameSpec.encode),
                frame_specs(valid=True).map(FrameSpec.encode),
                st.binary(max_size=40),
            ),
            max_size=max_frames,
        )
    )
    data = b"".join(parts)
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


@st.composite
def server_streams(draw: st.DrawFn, max_frames: int = 8) -> bytes:
    """Bytes a server might write: unmasked frames (some masked or with reserved bits) and noise."""
    specs = draw(st.lists(frame_specs(), max_size=max_frames))
    parts = [
        frame(
            s.opcode,
            s.payload,
            fin=s.fin,
            rsv=s.rsv if draw(st.booleans()) else 0,
            masked=not s.masked,
            key=s.key,
            wide=s.wide,
        )
        for s in specs
    ]
    parts += draw(st.lists(st.binary(max_size=40), max_size=2))
    return b"".join(draw(st.permutations(parts)))


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` in pieces split at ``cuts`` (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        yield data[a:b]
