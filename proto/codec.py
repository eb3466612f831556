"""JSON and MessagePack codecs over the same frame schema.

The codec is chosen once per connection from ``Sec-WebSocket-Protocol``:
``gw.v1.json`` (text frames) or ``gw.v1.msgpack`` (binary frames); JSON when
the client offers neither.

Publications travel between processes as JSON bytes (what a backend sends
with a plain ``PUBLISH``). Each codec turns such bytes into a push frame once
per publication; the hub then writes the same bytes to every subscriber.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from proto.codes import ErrorCode, error_message, is_temporary
from proto.frames import (
    MAX_ID,
    ClientFrame,
    Command,
    ErrorBody,
    Push,
    Reply,
)
from proto.publication import check_json, from_msgpack

__all__ = [
    "CODECS",
    "Codec",
    "JsonCodec",
    "MsgpackCodec",
    "ProtocolError",
    "select_codec",
]

_KNOWN_OPS: Final = frozenset(
    {
        "sub",
        "unsub",
        "pub",
        "ping",
        "rpc",
        "call",
        "refresh",
        "history",
        "presence",
        "presence_stats",
    }
)


class ProtocolError(Exception):
    """A client frame that cannot be executed; becomes one error reply."""

    def __init__(self, code: ErrorCode, id: int | None = None, detail: str | None = None) -> None:
        self.code = code
        self.id = id
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        base = error_message(self.code)
        return f"{base}: {self.detail}" if self.detail else base


_SURROGATE = (
    "a string holds a lone surrogate (an escape in \\ud800-\\udfff), which no codec carries"
)


def _id_of(frame: ClientFrame) -> Any:
    """A failed frame's ``id``, when it is one a reply can carry (else None)."""
    fid = frame.id
    return fid if type(fid) is int and 0 <= fid <= MAX_ID else None


class Codec:
    """Base codec: subclasses set the msgspec encoder/decoder pair."""

    name: str
    binary: bool
    index: int  # position in CODECS; lets the hub cache one frame per codec

    __slots__ = ()

    _decoder: msgspec.json.Decoder[Command] | msgspec.msgpack.Decoder[Command]
    _lenient: msgspec.json.Decoder[ClientFrame] | msgspec.msgpack.Decoder[ClientFrame]

    def decode(self, data: bytes | str) -> Command:
        """Decode and validate one client frame or raise `ProtocolError`."""
        try:
            return self._decoder.decode(data)  # type: ignore[arg-type]
        except RecursionError:
            raise ProtocolError(ErrorCode.BAD_FRAME, None, "nested too deeply") from None
        except msgspec.DecodeError as exc:
            try:
                lenient: ClientFrame | None = self._lenient.decode(data)  # type: ignore[arg-type]
            except (msgspec.DecodeError, RecursionError):
                lenient = self._salvage(data)
                if lenient is not None:  # readable, but past what any codec carries
                    raise ProtocolError(ErrorCode.BAD_FRAME, _id_of(lenient), _SURROGATE) from None
            raise self._explain(lenient, exc) from None

    def _salvage(self, data: bytes | str) -> ClientFrame | None:
        """The id and op of a frame the lenient decoder cannot read either, where the
        codec's grammar still allows it (None: it does not)."""
        return None

    def encode(self, obj: object) -> bytes:
        raise NotImplementedError

    def encode_push(
        self, ch: str, data_json: bytes, offset: int | None = None, epoch: str | None = None
    ) -> bytes:
        """The push of a publication (with its position on history channels)."""
        raise NotImplementedError

    def data_to_json(self, data: msgspec.Raw) -> bytes:
        """The JSON bytes of a client's ``data`` (the inter-process form).

        Raises `proto.InvalidData` when not every codec could carry it
        (proto/publication.py).
        """
        raise NotImplementedError

    def ok(self, id: int) -> bytes:
        return self.encode(Reply(id=id, ok=True))

    def rpc_reply(
        self, id: int, status: int, headers: dict[str, str], body_json: bytes | None
    ) -> bytes:
        """The reply to an ``rpc``: the core's status, headers and JSON body."""
        body = None if body_json is None else self.json_to_raw(body_json)
        return self.encode(Reply(id=id, ok=True, status=status, headers=headers or None, body=body))

    def data_reply(self, id: int, data_json: bytes | None) -> bytes:
        """A success carrying ``data`` (JSON bytes; None: none): a ``call``'s, a hooked ``sub``'s."""
        data = None if data_json is None else self.json_to_raw(data_json)
        return self.encode(Reply(id=id, ok=True, data=data))

    def json_to_raw(self, data_json: bytes) -> msgspec.Raw:
        """JSON bytes as a value embedded in this codec's frames."""
        raise NotImplementedError

    def error(self, id: int | None, code: ErrorCode, detail: str | None = None) -> bytes:
        message = error_message(code) if detail is None else f"{error_message(code)}: {detail}"
        body = ErrorBody(code=int(code), message=message, temporary=is_temporary(code))
        return self.encode(Reply(id=id, ok=False, error=body))

    def app_error(self, id: int, code: int, message: str, temporary: bool) -> bytes:
        """An error reply in the application's own words (a hook backend's, `APP_ERRORS`)."""
        body = ErrorBody(code=code, message=message, temporary=temporary)
        return self.encode(Reply(id=id, ok=False, error=body))

    def error_for(self, exc: ProtocolError) -> bytes:
        return self.error(exc.id, exc.code, exc.detail)

    def _explain(self, lenient: ClientFrame | None, exc: msgspec.DecodeError) -> ProtocolError:
        if lenient is None:
            return ProtocolError(ErrorCode.BAD_FRAME, None, str(exc))
        id = _id_of(lenient)
        if isinstance(lenient.op, str) and lenient.op not in _KNOWN_OPS:
            return ProtocolError(ErrorCode.UNKNOWN_OP, id, repr(lenient.op)[:64])
        if "`$.ch`" in str(exc):
            return ProtocolError(ErrorCode.INVALID_CHANNEL, id, str(exc))
        return ProtocolError(ErrorCode.BAD_FRAME, id, str(exc))


class JsonCodec(Codec):
    name = "gw.v1.json"
    binary = False
    index = 0

    __slots__ = ()

    _decoder = msgspec.json.Decoder(Command)
    _lenient = msgspec.json.Decoder(ClientFrame)
    _encoder: Final = msgspec.json.Encoder()

    def _salvage(self, data: bytes | str) -> ClientFrame | None:
        # JSON's grammar allows an escaped lone surrogate ("\ud800", what a browser's
        # JSON.stringify writes for a sliced emoji), which msgspec refuses, and the
        # frame's id with it: the sender's command then waited for its timeout.
        try:
            if isinstance(data, str):
                data = data.encode()
            # Each escape \udXYZ becomes \u0XYZ, no surrogate (only the id is read): two
            # scans at memory speed, where a regular expression's replacements took 1 ms
            # a 64 KB frame of escapes (12 times a plain malformed frame's cost).
            readable = data.replace(b"\\ud", b"\\u0").replace(b"\\uD", b"\\u0")
            return None if readable == data else self._lenient.decode(readable)
        except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
            return None

    def encode(self, obj: object) -> bytes:
        return self._encoder.encode(obj)

    def encode_push(
        self, ch: str, data_json: bytes, offset: int | None = None, epoch: str | None = None
    ) -> bytes:
        # Concatenation keeps the publisher's bytes untouched: no re-encode.
        head = b'{"op":"msg","ch":' + self._encoder.encode(ch)
        if offset is not None:
            head += b',"offset":%d,"epoch":' % offset + self._encoder.encode(epoch)
        return head + b',"data":' + data_json + b"}"

    def data_to_json(self, data: msgspec.Raw) -> bytes:
        return check_json(bytes(data))

    def json_to_raw(self, data_json: bytes) -> msgspec.Raw:
        return msgspec.Raw(data_json)


class MsgpackCodec(Codec):
    name = "gw.v1.msgpack"
    binary = True
    index = 1

    __slots__ = ()

    _decoder = msgspec.msgpack.Decoder(Command)
    _lenient = msgspec.msgpack.Decoder(ClientFrame)
    _encoder: Final = msgspec.msgpack.Encoder()

    def decode(self, data: bytes | str) -> Command:
        if isinstance(data, str):
            raise ProtocolError(ErrorCode.BAD_FRAME, None, "text frame on a msgpack connection")
        return super().decode(data)

    def encode(self, obj: object) -> bytes:
        return self._encoder.encode(obj)

    def encode_push(
        self, ch: str, data_json: bytes, offset: int | None = None, epoch: str | None = None
    ) -> bytes:
        data = msgspec.json.decode(data_json)
        return self._encoder.encode(Push(ch=ch, data=data, offset=offset, epoch=epoch))

    def data_to_json(self, data: msgspec.Raw) -> bytes:
        # bytes values become base64 strings in JSON (documented).
        return from_msgpack(bytes(data))

    def json_to_raw(self, data_json: bytes) -> msgspec.Raw:
        return msgspec.Raw(self._encoder.encode(msgspec.json.decode(data_json)))


JSON: Final = JsonCodec()
MSGPACK: Final = MsgpackCodec()
CODECS: Final[tuple[Codec, ...]] = (JSON, MSGPACK)
_BY_NAME: Final = {c.name: c for c in CODECS}


def select_codec(offered: list[str]) -> tuple[Codec, str | None]:
    """Pick the codec for a handshake: the client's first supported offer.

    Returns the codec and the subprotocol to echo (None: send no header).
    """
    for name in offered:
        codec = _BY_NAME.get(name.strip())
        if codec is not None:
            return codec, codec.name
    return JSON, None
