"""The two encodings of protocol v1 from the client's side, over proto's types.

Commands are proto's `Command` structs encoded by proto's codecs; what the
server sends is decoded into proto's `Reply` or one of its push types, so
the client and the gateway share one definition of every frame. A reply is
the only frame without an ``op``: a frame is decoded as a push first (the
common case) and as a reply when it has no ``op``.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from proto import (
    JSON_CODEC,
    MSGPACK_CODEC,
    Codec,
    Command,
    Expiring,
    Gap,
    Join,
    Leave,
    Push,
    Reply,
    Rpc,
    Unsubscribed,
)

__all__ = ["ENCODINGS", "JSON", "MSGPACK", "Encoding", "RpcCommand", "ServerFrame", "ServerPush"]

ServerPush = Push | Expiring | Gap | Unsubscribed | Join | Leave
ServerFrame = Reply | ServerPush


class _Reply(Reply, frozen=True, omit_defaults=True):
    """proto's `Reply` as a client decodes it.

    msgspec decodes a ``Raw | None`` field from ``null`` only, so ``body``
    and ``data`` are plain ``Raw`` here, empty when absent (204/304 and
    non-rpc replies; replies without a backend's data).
    """

    body: msgspec.Raw = msgspec.Raw()
    data: msgspec.Raw = msgspec.Raw()


class RpcCommand(Rpc, frozen=True, omit_defaults=True):
    """proto's `Rpc` as a client writes it: no ``body`` field when there is none.

    (An empty ``Raw`` would be written as nothing after ``"body":``.)
    """


class Encoding:
    """One subprotocol: how commands and values are written, how frames are read."""

    __slots__ = (
        "_codec",
        "_pushes",
        "_replies",
        "_value_decode",
        "_value_encode",
        "binary",
        "name",
    )

    def __init__(self, codec: Codec, module: Any) -> None:
        self._codec = codec
        self.name: str = codec.name
        self.binary: bool = codec.binary
        self._pushes = module.Decoder(ServerPush)
        self._replies = module.Decoder(_Reply)
        self._value_encode = module.Encoder().encode
        self._value_decode = module.Decoder().decode

    def command(self, cmd: Command) -> bytes:
        return self._codec.encode(cmd)

    def raw(self, value: Any) -> msgspec.Raw:
        """A value (``data`` of a ``pub``, ``body`` of an ``rpc``) as embedded bytes."""
        return msgspec.Raw(self._value_encode(value))

    def value(self, raw: msgspec.Raw) -> Any:
        """The value of embedded bytes (``body`` of a reply, ``data`` of history)."""
        return self._value_decode(raw)

    def decode(self, data: bytes | str) -> ServerFrame:
        """One server frame; `msgspec.DecodeError` when it is none."""
        try:
            frame: ServerFrame = self._pushes.decode(data)
        except msgspec.ValidationError:
            frame = self._replies.decode(data)
        return frame


JSON: Final = Encoding(JSON_CODEC, msgspec.json)
MSGPACK: Final = Encoding(MSGPACK_CODEC, msgspec.msgpack)
ENCODINGS: Final = {"json": JSON, "msgpack": MSGPACK}
