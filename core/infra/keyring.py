"""The active API keys every process verifies against, and their shared snapshot.

The core reads the active keys from PostgreSQL (core/apikeys.py) and writes
them, as a snapshot, through the broker (Redis): SHA-256 digests, never the
keys, with each key's channel patterns and REST flag. A gateway that runs
without a database (``CORE_URL``) reads that snapshot instead, at start, on
every ``api_keys_changed`` control message and on each sync period, so an
API key works on its sockets and ``POST /api/publish`` as it does on a
gateway with the core inside. Whoever can write Redis could forge the
snapshot, but could as well publish on any channel directly: Redis is inside
the trust boundary (docs/security.md).

`KeyRing` swaps the verifier's mapping in one step and reports the subjects
of keys that disappeared, so their sockets are closed (4510).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping

import msgspec

from core.infra.identity import Identity
from proto import Grants

__all__ = ["SNAPSHOT_KEY", "KeyEntry", "KeyRing", "decode_snapshot", "encode_snapshot"]

log = logging.getLogger("core.infra.keyring")

#: Where the snapshot is stored (`Broker.put_value`).
SNAPSHOT_KEY = "api_keys"


class KeyEntry(msgspec.Struct, frozen=True):
    """One active key: the hex SHA-256 of the key, its id, what it may do."""

    digest: str
    id: str
    channels: list[str]
    rest: bool


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[KeyEntry])


def encode_snapshot(entries: Iterable[KeyEntry]) -> bytes:
    return _encoder.encode(sorted(entries, key=lambda e: e.id))


def decode_snapshot(data: bytes) -> list[KeyEntry] | None:
    """The entries in ``data``, or None (logged) when it is not a snapshot."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        log.warning("API key snapshot ignored: %s", exc)
        return None


class KeyRing:
    """The verifier's mapping of active keys (digest -> identity), replaced whole."""

    def __init__(
        self,
        ring: MutableMapping[bytes, Identity],
        reserved: tuple[str, ...] = (),
        on_revoked: Callable[[str], object] | None = None,
    ) -> None:
        self.ring = ring
        self._reserved = reserved  # channels only the core publishes on
        self._on_revoked = on_revoked

    def replace(self, entries: Iterable[KeyEntry]) -> None:
        """Make ``entries`` the active keys; close what a key no longer listed held."""
        fresh: dict[bytes, Identity] = {}
        for entry in entries:
            claims = {"channels": entry.channels, "pub": True}
            grants = Grants.from_claims(claims, reserved=self._reserved)
            identity = Identity(f"apikey:{entry.id}", grants, None, None, "service", entry.rest)
            fresh[bytes.fromhex(entry.digest)] = identity
        gone = {i.sub for i in self.ring.values()} - {i.sub for i in fresh.values()}
        # No await between these two lines: no request sees a half-updated ring.
        self.ring.clear()
        self.ring.update(fresh)
        if self._on_revoked is not None:
            for sub in sorted(gone):
                self._on_revoked(sub)
