"""What an identity may do on channels, from its token claims.

The rule (documented in docs/protocol.md):

* ``channels``: a list of glob patterns (``*`` any run of characters,
  ``?`` one character, ``[seq]`` one of a set; case-sensitive; ``*`` also
  matches ``:``). A connection may subscribe to a channel iff the name matches
  one pattern. No claim, or an empty list, grants nothing.
* ``pub``: absent or ``true`` - the connection may publish on every channel
  it may subscribe to; ``false`` - it may publish nowhere; a list of
  patterns - only on channels that match ``channels`` *and* this list.
* ``reserved`` (not a claim: the deployment's ``CORE_CHANNELS``): no client
  publishes on a channel that matches one of these, whatever its claims; the
  core publishes its change events there itself.
* ``system`` (not a claim either): the system's own channels (``__…``) this
  identity may subscribe to, by exact name; the verifier gives admins
  ``__admin``, the console's (docs/operations.md). No claim reaches them.

Identical claims share one `Grants` object (tokens minted for many users
usually carry the same patterns), which keeps per-connection memory small.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["Grants", "InvalidGrants"]


class InvalidGrants(ValueError):
    """The claims do not have the documented shape."""


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Grants:
    __slots__ = ("_pub", "_reserved", "_sub", "channels", "publish", "reserved", "system")

    channels: tuple[str, ...]
    publish: bool | tuple[str, ...]
    #: patterns no client may publish on, whatever its claims (the core's channels)
    reserved: tuple[str, ...]
    #: system channels (``__…``) it may subscribe to, by name
    system: tuple[str, ...]

    def __init__(
        self,
        channels: tuple[str, ...],
        publish: bool | tuple[str, ...],
        reserved: tuple[str, ...] = (),
        system: tuple[str, ...] = (),
    ) -> None:
        self.channels = channels
        self.publish = publish
        self.reserved = reserved
        self.system = system
        self._sub = _compile(channels)
        self._pub = _compile(publish) if isinstance(publish, tuple) else None
        self._reserved = _compile(reserved)

    def can_subscribe(self, ch: str) -> bool:
        return self._sub is not None and self._sub.match(ch) is not None

    def can_publish(self, ch: str) -> bool:
        if self.publish is False or not self.can_subscribe(ch):
            return False
        if self._reserved is not None and self._reserved.match(ch) is not None:
            return False
        if self.publish is True:
            return True
        return self._pub is not None and self._pub.match(ch) is not None

    @classmethod
    def from_claims(
        cls,
        claims: Mapping[str, Any],
        reserved: tuple[str, ...] = (),
        system: tuple[str, ...] = (),
    ) -> Grants:
        channels = claims.get("channels", [])
        publish = claims.get("pub", True)
        if not isinstance(channels, list) or not all(isinstance(p, str) for p in channels):
            raise InvalidGrants("claim 'channels' must be a list of strings")
        if isinstance(publish, list):
            if not all(isinstance(p, str) for p in publish):
                raise InvalidGrants("claim 'pub' must be a boolean or a list of strings")
            return _shared(tuple(channels), tuple(publish), reserved, system)
        if not isinstance(publish, bool):
            raise InvalidGrants("claim 'pub' must be a boolean or a list of strings")
        return _shared(tuple(channels), publish, reserved, system)

    def __repr__(self) -> str:
        return (
            f"Grants(channels={self.channels!r}, publish={self.publish!r}, "
            f"reserved={self.reserved!r}, system={self.system!r})"
        )


@functools.lru_cache(maxsize=4096)
def _shared(
    channels: tuple[str, ...],
    publish: bool | tuple[str, ...],
    reserved: tuple[str, ...],
    system: tuple[str, ...],
) -> Grants:
    return Grants(channels, publish, reserved, system)
