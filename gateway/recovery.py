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

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.hub import Prepared
from gateway.node import HistoryRead
from proto import ErrorCode, History, HistoryItem, Position, Reply, Subscribed

if TYPE_CHECKING:
    from gateway.session import Session

__all__ = ["MAX_HELD", "MAX_OFFSET", "Answer", "history", "recovers", "subscribe_recovering"]


#: Live publications held per channel while its history is read.
MAX_HELD = 10_000
MAX_OFFSET = 2**53 - 1


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
    slip in between.
    """
    conn = session.conn
    held = session.held = session.held if session.held is not None else {}
    held[ch] = []
    seen = session.node.seen(ch)  # from here on, live publications are held
    try:
        await session.node.subscribe(ch, session)
        after = since.offset if since is not None else MAX_OFFSET
        size = session.node.history_policy.size
        read = await session.node.history(ch, after, size, covering=seen, holding=True)
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
        for offset, data in entries:
            session.transport.deliver(Prepared(ch, data, Position(offset, epoch)), session.codec)
            last = offset
    for prepared in buffered:
        if prepared.offset is None or prepared.epoch != epoch or prepared.offset > last:
            session.transport.deliver(prepared, session.codec)


async def history(session: Session, cmd: History) -> None:
    if not session.node.history_policy.applies(cmd.ch):
        code = ErrorCode.NO_HISTORY
        session._reply_error(session.conn.error_reply(cmd, code, cmd.ch), code)
        return
    entries, top, _ = await session.node.history(cmd.ch, cmd.since, cmd.limit)
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
