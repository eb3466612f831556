"""Recovery: a subscriber that comes back gets what it missed, with no gap or repeat.

A ``sub`` with ``since`` (offset and epoch) on a history channel
(HISTORY_CHANNELS) subscribes, reads the channel's history after that
offset, and answers ``recovered: true`` when the history still holds every
publication since (same epoch, no gap), followed by those publications and
then the live ones. A ``history`` command reads the history alone. The
session (gateway/session.py) calls these; how positions and epochs work is
in docs/protocol.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from core.infra.broker import Entry
from core.infra.ratelimit import local_spend
from gateway.hub import Prepared
from gateway.node import HistoryRead
from proto import ErrorCode, History, HistoryItem, Position, Reply, Subscribed

if TYPE_CHECKING:
    from gateway.session import Session

log = logging.getLogger("gateway.recovery")
__all__ = [
    "MAX_HELD",
    "MAX_OFFSET",
    "MAX_PAGE_BYTES",
    "MAX_RECOVERY_BYTES",
    "Answer",
    "could_recover",
    "history",
    "recovers",
    "repair_gap",
    "subscribe_recovering",
]


#: Live publications held per channel while its history is read.
MAX_HELD = 10_000
#: Data a ``history`` reply carries at most (but always one publication): a page of
#: large publications in one frame passed a connection's `SEND_BUFFER_BYTES` (1 MiB),
#: and the client asking was closed as a slow consumer (4001) however fast it read.
MAX_PAGE_BYTES = 256 * 1024
#: Data a recovering ``sub`` sends on a socket before the rest is left to ``history``
#: pages (a ``gap`` follows what was sent): 100 missed publications of 60 KB went out at
#: once, past the socket's ``SEND_BUFFER_BYTES``, and closed a client that read them all
#: as a slow consumer (4001). Event streams, which cannot ask ``history``, get it all.
MAX_RECOVERY_BYTES = MAX_PAGE_BYTES
#: A ``history`` read counts one more command for each this many bytes read, as a
#: big ``presence`` does: a socket pages through at most ~12 MB a second.
PAGE_BYTES_PER_COMMAND = MAX_PAGE_BYTES // 2
MAX_OFFSET = 2**53 - 1
#: History reads a gap's repair makes at most (`repair_gap`) before it tells the client.
_FILL_READS = 5


def recovers(since: Position, read: HistoryRead) -> bool:
    """Whether ``read`` holds every publication after ``since`` (same epoch, no gap).

    It must begin right after ``since`` and reach the top: a read stops at
    this gateway's ``HISTORY_SIZE``, and a publisher may keep more (another
    setting, a rollout that changes it). A client that missed more than a
    read holds is told it cannot recover, as when the history lost them.
    Entries left out as not publishable (`Node.history`) count as read:
    their live publication was left out too.
    """
    top, span = read.top, read.span
    if top is None or top.epoch != since.epoch or since.offset > top.offset:
        return False
    return since.offset == top.offset or (
        span is not None and span[0] == since.offset + 1 and span[1] == top.offset
    )


def could_recover(since: Position, top: Position | None, size: int) -> bool:
    """Whether a read of ``size`` entries after ``since`` could recover, ``top`` being the top.

    False only where `recovers` is False whatever the read holds: another
    epoch, a position ahead of the top, or more missed than one read holds
    (offsets are consecutive, so a read that reaches the top from ``since``
    spans ``top.offset - since.offset`` of them).
    """
    return top is not None and top.epoch == since.epoch and 0 <= top.offset - since.offset <= size


async def _read(
    session: Session, ch: str, since: Position | None, seen: Position | None
) -> HistoryRead:
    """The history read a subscription from ``since`` needs: its entries only if usable.

    A ``since`` of another epoch, or too far behind, cannot be recovered, and
    reading its entries anyway had Redis send up to ``HISTORY_SIZE`` of them
    (each up to `MAX_PUBLICATION_BYTES`) for a 100-byte ``sub`` that answers
    ``recovered: false``. Where this node's last position (``seen``) says the
    client may recover, the entries are read at once, as before; otherwise
    where the channel stands is read first (as a ``sub`` without ``since``
    reads it, shared with those), and the entries only if they could serve.
    """
    node, size = session.node, session.node.history_policy.size
    if since is not None and seen is not None and could_recover(since, seen, size):
        return await node.history(ch, since.offset, size, covering=seen, holding=True)
    read = await node.history(ch, MAX_OFFSET, size, covering=seen, holding=True)
    top = read.top
    if since is None or top is None or since.offset == top.offset:
        return read  # (nothing missed: `recovers` says so from the top alone)
    if not could_recover(since, top, size):
        return read
    return await node.history(ch, since.offset, size, covering=seen, holding=True)


#: The frame that answers a subscription, from ``recovered`` (None: no ``since``)
#: and where the channel stands: a reply to a ``sub``, or a ``subscribed`` push.
Answer = Callable[[bool | None, Position | None], Reply | Subscribed]


async def subscribe_recovering(
    session: Session, ch: str, since: Position | None, answer: Answer
) -> None:
    """Subscribe, recovering what was missed ``since``, with no gap or repeat at the seam.

    Live publications are held while the history is read; afterwards the
    answer, the missed publications and the held ones (those after the
    last offset sent) go out in one synchronous run, so nothing live can
    slip in between. On a socket, missed publications past
    `MAX_RECOVERY_BYTES` are not sent: a ``gap`` follows those that were,
    and the client pages the rest with ``history`` as after any ``gap``
    (the held ones come after it, as a ``gap``'s live publications do).
    """
    conn = session.conn
    held = session.held = session.held if session.held is not None else {}
    held[ch] = []
    seen = session.node.seen(ch)  # from here on, live publications are held
    try:
        await session.node.subscribe(ch, session)
        read = await _read(session, ch, since, seen)
    except BaseException:
        held.pop(ch, None)
        session.node.unsubscribe(ch, session)
        raise
    buffered = held.pop(ch)
    if conn.closed:
        session.node.unsubscribe(ch, session)
        return
    conn.subscribed(ch)
    recovered = None
    entries, top, _ = read
    last = top.offset if top is not None else 0
    if since is not None:
        recovered = recovers(since, read)
        if recovered:
            last = since.offset
    session.transport.send(session.codec.encode(answer(recovered, top)))
    epoch = top.epoch if top is not None else None
    if recovered:
        assert epoch is not None  # recovery implies a history
        limit = MAX_RECOVERY_BYTES if session.transport.kind == "websocket" else None
        sent = 0
        for offset, data in entries:
            if limit is not None and sent and sent + len(data) > limit:
                session.gap(ch)  # the rest from `history`, after `last`
                break
            session.transport.deliver(Prepared(ch, data, Position(offset, epoch)), session.codec)
            last = offset
            sent += len(data)
    for prepared in buffered:
        if prepared.offset is None or prepared.epoch != epoch or prepared.offset > last:
            session.transport.deliver(prepared, session.codec)


def repair_gap(
    session: Session, ch: str, since: Position, tell: Callable[[], None]
) -> Coroutine[Any, Any, None] | None:
    """Fill a ``gap`` on ``ch`` from history, for a transport that cannot ask (an event stream).

    ``since`` is the last publication the client got. Live publications on
    ``ch`` are held from this call on (call it as the gap arrives: one
    delivered before would move the client past the hole), and the
    coroutine returned reads the history after ``since``: when that holds
    every one since (`recovers`), they go out, then the held ones, read
    again wherever the held ones do not follow on (the link came back after
    the read), and the client never sees the gap. Otherwise (the history
    lost or moved on, Redis failing again, a recovery of ``ch`` under way)
    ``tell`` sends the ``gap`` before the held ones, as without a repair.
    """
    held = session.held = session.held if session.held is not None else {}
    if ch in held:
        tell()
        return None
    held[ch] = []
    return _fill(session, held, ch, since, tell)


async def _fill(
    session: Session,
    held: dict[str, list[Prepared]],
    ch: str,
    since: Position,
    tell: Callable[[], None],
) -> None:
    epoch, last = since.epoch, since.offset
    for _ in range(_FILL_READS):
        at = Position(last, epoch)
        read: HistoryRead | None = None
        try:
            read = await _read(session, ch, at, session.node.seen(ch))
        except Exception as exc:  # told with the gap, as without a repair
            log.info("could not repair a gap on %s: %s", ch, exc)
        if session.conn.closed:
            held.pop(ch, None)
            return
        if read is None or not recovers(at, read):
            break
        for offset, data in read.entries:
            if offset > last:
                session.transport.deliver(
                    Prepared(ch, data, Position(offset, epoch)), session.codec
                )
                last = offset
        buffered = held[ch]
        for n, prepared in enumerate(buffered):
            if prepared.offset is not None and prepared.epoch == epoch:
                if prepared.offset <= last:
                    continue  # the history brought it
                if prepared.offset > last + 1:
                    held[ch] = buffered[n:]  # a hole before it: read again from ``last``
                    break
                last = prepared.offset
            session.transport.deliver(prepared, session.codec)
        else:
            del held[ch]
            return
    tell()
    for prepared in held.pop(ch, ()):
        if prepared.offset is None or prepared.epoch != epoch or prepared.offset > last:
            session.transport.deliver(prepared, session.codec)


async def _page(
    session: Session, ch: str, after: int, limit: int
) -> tuple[list[Entry], Position | None, int]:
    """Up to ``limit`` publications after ``after`` within `MAX_PAGE_BYTES` (at least
    one), where the channel stands, and the bytes read for them.

    Read a few at a time: one first, then as many as its size says fit, so that
    Redis sends little more than the page, whatever size the publications are.
    """
    node = session.node
    entries: list[Entry] = []
    size = read = 0
    want = 1
    while True:
        got = await node.history(ch, after, want)
        top, span = got.top, got.span
        for offset, data in got.entries:
            read += len(data)
            if entries and size + len(data) > MAX_PAGE_BYTES:
                return entries, top, read  # the client asks again from the last offset
            entries.append((offset, data))
            size += len(data)
        if span is None or top is None or span[1] >= top.offset:
            return entries, top, read
        limit -= len(got.entries)
        after = span[1]
        if limit <= 0:
            return entries, top, read
        each, room = max(1, size // max(1, len(entries))), MAX_PAGE_BYTES - size
        if room < each:
            return entries, top, read  # the next one would hardly fit: the page is full
        want = min(limit, room // each)


async def history(session: Session, cmd: History) -> None:
    if not session.node.history_policy.applies(cmd.ch):
        code = ErrorCode.NO_HISTORY
        session._reply_error(session.conn.error_reply(cmd, code, cmd.ch), code)
        return
    entries, top, read = await _page(session, cmd.ch, cmd.since, cmd.limit)
    extra = read // PAGE_BYTES_PER_COMMAND
    if extra > 0 and session.commands is not None:
        session._commands_tat = local_spend(session.commands, session._commands_tat, extra)
    items = [HistoryItem(offset, session.codec.json_to_raw(data)) for offset, data in entries]
    reply = Reply(
        id=cmd.id,
        ok=True,
        offset=top.offset if top is not None else None,
        epoch=top.epoch if top is not None else None,
        publications=items,
    )
    if not session.conn.closed:
        session.transport.send(session.codec.encode(reply))
