"""Run one case against one server and judge what came back.

The verdict reads only the wire: status lines, frames and when the TCP
connection ended. Waits scale with `tests.servers.UNIT`; "promptly" means
within `PROMPT` units of the last write.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from tests.conformance.cases import Case, Closes, Cut, Http, Pause, Replies, Send, Target
from tests.conformance.wire import (
    Event,
    Inflater,
    Recorder,
    accept_for,
    close_payload,
    extension_answer,
    frame,
    read_head,
    set_nodelay,
    upgrade_request,
)
from tests.servers import UNIT

__all__ = ["PROMPT", "Verdict", "run_case", "run_cases"]

#: Units of time a server has to answer, close, or end TCP after a close.
PROMPT = 2.0
_SETTLE = 0.3  # units to wait for anything unexpected (`Replies.quiet`)
_CLOSE = 8


@dataclass(frozen=True)
class Verdict:
    case: str
    passed: bool
    detail: str


class _Failed(Exception):
    pass


async def run_case(case: Case, target: Target) -> Verdict:
    """Open a connection, play the case's script, and judge the outcome."""
    try:
        async with asyncio.timeout(30 * UNIT):
            detail = await _play(case, target)
    except _Failed as exc:
        return Verdict(case.id, False, str(exc))
    except (OSError, TimeoutError) as exc:
        return Verdict(case.id, False, f"{type(exc).__name__}: {exc}")
    return Verdict(case.id, True, detail)


async def run_cases(cases: list[Case], target: Target, concurrency: int = 8) -> list[Verdict]:
    """Every case against ``target``, ``concurrency`` connections at a time, in case order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(case: Case) -> Verdict:
        async with gate:
            return await run_case(case, target)

    return list(await asyncio.gather(*(one(c) for c in cases)))


async def _play(case: Case, target: Target) -> str:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    set_nodelay(writer)
    try:
        if isinstance(case.expect, Cut):
            return await _cut(case, target, reader, writer)
        extra = () if case.offer is None else (("Sec-WebSocket-Extensions", case.offer),)
        build = case.request or (
            lambda t: upgrade_request(t.path, f"{t.host}:{t.port}", extra=extra)
        )
        request, key = build(target)
        steps = list(case.steps)
        if case.with_request and steps and isinstance(first := steps[0], Send):
            request += first.data
            steps.pop(0)
        writer.write(request)
        await writer.drain()
        try:
            async with asyncio.timeout(PROMPT * UNIT):
                status, headers, rest = await read_head(reader)
        except TimeoutError:
            raise _Failed("no answer to the upgrade request") from None
        if isinstance(case.expect, Http):
            return _judge_http(case.expect, status, headers)
        if status != 101:
            raise _Failed(f"upgrade answered {status or 'by closing'}")
        if headers.get("sec-websocket-accept") != accept_for(key):
            raise _Failed("wrong Sec-WebSocket-Accept")
        answer = _judge_answer(case, headers)
        recorder = Recorder(reader, rest, inflater=None if answer is None else Inflater(answer))
        task = asyncio.create_task(recorder.run())
        try:
            return await _session(case, steps, recorder, writer)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _judge_answer(case: Case, headers: dict[str, str]) -> dict[str, str | None] | None:
    """The permessage-deflate the server agreed to, checked against the offer (RFC 7692 §7.1)."""
    answer = extension_answer(headers)
    if answer is None and "sec-websocket-extensions" in headers:
        raise _Failed(f"an extension nobody offered: {headers['sec-websocket-extensions']}")
    if case.agreed is not None and (answer is not None) != case.agreed:
        raise _Failed(f"offer {case.offer!r} {'declined' if case.agreed else 'accepted'}")
    if answer is None:
        return None
    if case.offer is None:
        raise _Failed("permessage-deflate agreed without an offer")
    offered = [
        {p.split("=")[0].strip(): p.partition("=")[2].strip().strip('"') for p in o.split(";")[1:]}
        for o in case.offer.split(",")
        if o.split(";")[0].strip().lower() == "permessage-deflate"
    ]
    known = {"server_no_context_takeover", "client_no_context_takeover",
             "server_max_window_bits", "client_max_window_bits"}  # fmt: skip
    if set(answer) - known:
        raise _Failed(f"unknown parameters in the answer: {sorted(set(answer) - known)}")
    for name in ("server_max_window_bits", "client_max_window_bits"):
        value = answer.get(name)
        if name in answer and (value is None or not value.isdigit() or not 8 <= int(value) <= 15):
            raise _Failed(f"{name}={value} in the answer")
    # Some offer must allow the answer: a server window no wider than asked, a client
    # window only if offered, server_no_context_takeover if asked for.
    for params in offered:
        limit = params.get("server_max_window_bits")
        if limit and int(answer.get("server_max_window_bits") or 15) > int(limit):
            continue
        if "client_max_window_bits" in answer and "client_max_window_bits" not in params:
            continue
        if "server_no_context_takeover" in params and "server_no_context_takeover" not in answer:
            continue
        return answer
    raise _Failed(f"an answer no offer allows: {headers['sec-websocket-extensions']}")


def _judge_http(expect: Http, status: int, headers: dict[str, str]) -> str:
    if status not in expect.statuses:
        raise _Failed(f"status {status or '(closed)'}, expected {sorted(expect.statuses)}")
    if expect.header is not None:
        name, value = expect.header
        if headers.get(name) != value:
            raise _Failed(f"status {status} without {name}: {value}")
    return f"status {status}"


async def _cut(
    case: Case, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> str:
    """Drip the request; the server must end it within HEADER_TIMEOUT (plus slack)."""
    request, _ = upgrade_request(target.path, f"{target.host}:{target.port}")
    loop = asyncio.get_running_loop()
    start = loop.time()
    limit = target.header_timeout * 1.5 + PROMPT * UNIT
    step = 0.2 * UNIT

    async def drip() -> None:
        for i in range(len(request)):
            writer.write(request[i : i + 1])
            await writer.drain()
            await asyncio.sleep(step)

    dripping = asyncio.create_task(drip())
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass  # an error status (408) or nothing: either way the end counts
    except TimeoutError:
        raise _Failed(f"still open {limit:.1f} s into a dripped request") from None
    except OSError:
        pass
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await dripping
    return f"cut after {loop.time() - start:.1f} s"


async def _write(writer: asyncio.StreamWriter, send: Send, rec: Recorder) -> None:
    """Write ``send``; a chopped one stops only once the server ended TCP.

    A close frame does not cut a chopped frame short: a frame left
    half-written would make what the server reads next depend on timing.
    Writing on after the server's FIN would draw a reset that can discard
    its close frame before it is read.
    """
    data = send.data
    if send.chop is None:
        writer.write(data)
        await writer.drain()
        return
    for i in range(0, len(data), send.chop):
        if rec.first("eof") is not None:
            return
        writer.write(data[i : i + send.chop])
        await writer.drain()
        await asyncio.sleep(0.001 if send.chop < 64 else 0)


def _ended(rec: Recorder) -> bool:
    return rec.first("close") is not None or rec.first("eof") is not None


async def _session(
    case: Case, steps: list[Send | Pause], rec: Recorder, writer: asyncio.StreamWriter
) -> str:
    loop = asyncio.get_running_loop()
    client_closed = False
    skipped = 0  # writes not made because the server had closed already
    sends = [i for i, s in enumerate(steps) if isinstance(s, Send)]
    for i, step in enumerate(steps):
        if isinstance(step, Pause):
            await asyncio.sleep(step.units * UNIT)
            continue
        if _ended(rec):
            skipped = len([j for j in sends if j >= i])
            break
        try:
            await _write(writer, step, rec)
        except OSError:
            skipped = len([j for j in sends if j > i])
            break
        client_closed = client_closed or step.closes
    last = loop.time()
    expect = case.expect
    if isinstance(expect, Replies):
        return await _replies(expect, rec, writer, last)
    assert isinstance(expect, Closes)
    if expect.fail_fast and not skipped:
        await _until_closed(expect, rec, last)
        raise _Failed("closed only after the whole message, not at the invalid fragment")
    return await _closes(expect, rec, writer, last, client_closed)


def _bad(rec: Recorder) -> None:
    bad = rec.first("bad")
    if bad is not None:
        raise _Failed("the server sent a frame no server may send")


def _pongs(rec: Recorder) -> list[bytes]:
    return [e.payload for e in rec.events if e.kind == "pong"]


async def _replies(
    expect: Replies, rec: Recorder, writer: asyncio.StreamWriter, last: float
) -> str:
    deadline = last + PROMPT * UNIT
    while rec.data_count() < expect.messages or len(_pongs(rec)) < len(expect.pongs):
        _bad(rec)
        end = rec.first("close") or rec.first("eof")
        if end is not None:
            raise _Failed(
                f"closed ({_describe(end)}) after {rec.data_count()} of {expect.messages} replies"
            )
        if not await rec.wait(deadline):
            raise _Failed(
                f"{rec.data_count()} of {expect.messages} replies, "
                f"{len(_pongs(rec))} of {len(expect.pongs)} pongs"
            )
    if _pongs(rec)[: len(expect.pongs)] != list(expect.pongs):
        raise _Failed(f"pongs {_pongs(rec)!r}, expected {list(expect.pongs)!r}")
    if expect.quiet:
        await asyncio.sleep(_SETTLE * UNIT)
        if rec.data_count() > expect.messages or len(_pongs(rec)) > len(expect.pongs):
            raise _Failed("unexpected frames: " + ", ".join(e.kind for e in rec.events))
    _bad(rec)
    end = rec.first("close") or rec.first("eof")
    if end is not None:
        raise _Failed(f"closed ({_describe(end)}) after replying")
    # The connection is healthy: it must also close cleanly.
    writer.write(frame(_CLOSE, close_payload(1000)))
    await writer.drain()
    closing = asyncio.get_running_loop().time()
    seen = Closes(frozenset({1000}), before=rec.data_count(), pongs=tuple(_pongs(rec)))
    close = await _until_closed(seen, rec, closing)
    if close is None or close.code != 1000:
        raise _Failed(f"the closing handshake after the replies ended with {_describe(close)}")
    await _until_eof(rec, closing)
    return f"{rec.data_count()} replies, {len(_pongs(rec))} pongs, clean close"


async def _until_closed(expect: Closes, rec: Recorder, last: float) -> Event | None:
    """The server's close frame (None: TCP ended without one); fails on what contradicts ``expect``."""
    deadline = last + PROMPT * UNIT
    while True:
        _bad(rec)
        if rec.data_count() > expect.before:
            raise _Failed(
                f"{rec.data_count()} data messages, {expect.before} expected before the close"
            )
        if len(_pongs(rec)) > len(expect.pongs):
            raise _Failed("a pong to a ping that came after the violation or the close")
        close = rec.first("close")
        if close is not None:
            return close
        if rec.first("eof") is not None:
            return None
        if not await rec.wait(deadline):
            raise _Failed(f"no close within {PROMPT * UNIT:.1f} s")


async def _until_eof(rec: Recorder, since: float) -> None:
    # Capped: the gateway's CLOSE_TIMEOUT (5 s) is what a close that was never
    # completed looks like, so a slower machine's unit must not wait that out.
    deadline = since + PROMPT * min(UNIT, 2.0)
    while rec.first("eof") is None:
        if not await rec.wait(deadline):
            raise _Failed("the TCP connection stayed open after the closing handshake")


async def _closes(
    expect: Closes, rec: Recorder, writer: asyncio.StreamWriter, last: float, client_closed: bool
) -> str:
    close = await _until_closed(expect, rec, last)
    if rec.data_count() < expect.before:
        raise _Failed(
            f"closed ({_describe(close)}) after {rec.data_count()} of {expect.before} replies"
        )
    if _pongs(rec) != list(expect.pongs):
        raise _Failed(f"pongs {_pongs(rec)!r}, expected {list(expect.pongs)!r}")
    if close is None:
        if expect.drop_ok:
            return "TCP dropped"
        raise _Failed("TCP ended without a close frame")
    if close.code not in expect.codes:
        raise _Failed(f"close {_describe(close)}, expected {sorted(expect.codes)}")
    try:
        close.payload.decode()
    except UnicodeDecodeError:
        raise _Failed("the server's close reason is not UTF-8") from None
    answered = asyncio.get_running_loop().time()
    if not client_closed:
        with contextlib.suppress(OSError):
            writer.write(frame(_CLOSE, close_payload(1000)))
            await writer.drain()
    await _until_eof(rec, answered)
    return f"close {close.code}"


def _describe(event: Event | None) -> str:
    if event is None:
        return "TCP dropped, no close frame"
    if event.kind == "eof":
        return "TCP dropped"
    reason = event.payload.decode(errors="replace")
    return f"{event.code}" + (f" {reason!r}" if reason else "")
