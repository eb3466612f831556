"""One socket's account of its channels: every publication exactly once, in order.

Each publication the tool sends carries its channel's index ``c`` and that
channel's sequence number ``s`` (0, 1, 2…). A socket subscribes to one or
two channels (its group's and, with ``--broadcast``, the shared one), so its
`Ledger` keeps, per channel *slot*, the next sequence it expects. A delivery
is then one of:

* the one expected: in order;
* further on: the ones skipped are remembered as *missing* (usually none, so
  no set is allocated), and a missing one arriving later is *out of order*;
* behind, and not missing: a *duplicate*.

What is still missing when the run ends, plus whatever never arrived past
the last one received, is *lost*. A loss on a slot whose resubscription was
answered ``recovered: false`` is *explicit* (the server said so); any other
is *silent*. The ledger also keeps each slot's last history position
(offset, epoch), so a resubscription asks for what it missed (``since``).

Tens of thousands of these live in one process: slots, small lists, and
no set until there is a gap.
"""

from __future__ import annotations

from proto import Position

__all__ = ["Ledger"]

_SHIFT = 40  # missing entries are slot << _SHIFT | seq


class Ledger:
    __slots__ = (
        "chans",
        "disorder",
        "dups",
        "epochs",
        "expect",
        "missing",
        "offsets",
        "unrecovered",
    )

    def __init__(self, chans: tuple[int, ...]) -> None:
        #: the channel indexes of this socket, by slot (a tuple shared by its group)
        self.chans = chans
        self.expect = [0] * len(chans)
        self.missing: set[int] | None = None
        self.dups = 0
        self.disorder = 0
        self.offsets: list[int] | None = None
        self.epochs: list[str] | None = None
        #: a bit per slot: a resubscription was answered ``recovered: false``
        self.unrecovered = 0

    def record(self, c: int, s: int) -> bool | None:
        """Count a delivery of sequence ``s`` on channel ``c``.

        True when it is new, False for a duplicate, None when ``c`` is not
        one of this socket's channels.
        """
        try:
            slot = self.chans.index(c)
        except ValueError:
            return None
        expect = self.expect[slot]
        if s == expect:
            self.expect[slot] = s + 1
            return True
        if s > expect:
            if self.missing is None:
                self.missing = set()
            base = slot << _SHIFT
            self.missing.update(range(base + expect, base + s))
            self.expect[slot] = s + 1
            return True
        key = slot << _SHIFT | s
        if self.missing is not None and key in self.missing:
            self.missing.discard(key)
            self.disorder += 1
            return True
        self.dups += 1
        return False

    # -- history positions -------------------------------------------------

    def position(self, slot: int, offset: int | None, epoch: str | None) -> None:
        """Remember the last position seen on ``slot`` (from a push or a sub reply)."""
        if offset is None or epoch is None:
            return
        if self.offsets is None or self.epochs is None:
            self.offsets = [-1] * len(self.chans)
            self.epochs = [""] * len(self.chans)
        self.offsets[slot] = offset
        self.epochs[slot] = epoch

    def position_of(self, c: int, offset: int | None, epoch: str | None) -> None:
        if offset is not None and c in self.chans:
            self.position(self.chans.index(c), offset, epoch)

    def since(self, slot: int) -> Position | None:
        """Where a resubscription of ``slot`` recovers from; None without history."""
        if self.offsets is None or self.epochs is None or self.offsets[slot] < 0:
            return None
        return Position(offset=self.offsets[slot], epoch=self.epochs[slot])

    # -- the account at the end --------------------------------------------

    def _missing_in(self, slot: int) -> int:
        if not self.missing:
            return 0
        base = slot << _SHIFT
        return sum(1 for key in self.missing if base <= key < base + (1 << _SHIFT))

    def got(self, slot: int, sent: int) -> int:
        """Distinct publications of ``slot`` received, of the ``sent`` first ones."""
        return min(self.expect[slot], sent) - self._missing_in(slot)

    def lost(self, slot: int, sent: int) -> int:
        return sent - self.got(slot, sent)

    def complete(self, sent: list[int]) -> bool:
        """Whether every publication sent on every channel of this socket arrived."""
        return not self.missing and all(
            self.expect[slot] >= sent[c] for slot, c in enumerate(self.chans)
        )
