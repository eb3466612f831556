"""Long-poll: the socket's session for clients that cannot hold a WebSocket.

::

    POST /lp                      -> 201 {"session": "…", "cursor": 0}
    POST /lp/<session>   [frames] -> 202 (each frame as on the socket)
    GET  /lp/<session>?cursor=N   -> 200 {"messages": [...], "cursor": M}

(Polls, the hot path, are answered by gateway/transport/polls.py, below tornado.web.)

Every request carries the same token (``Authorization: Bearer``); a session
belongs to the ``sub`` that made it. Everything the session would send on a
socket (replies, pushes) goes into its outbox, numbered 1, 2, 3… A poll
returns what is numbered above ``cursor``, waiting up to
``LONGPOLL_TIMEOUT`` seconds (25) for something; the ``cursor`` of a poll
acknowledges everything up to it, which is then dropped. So a poll retried
after a lost answer gets the same messages again: nothing is lost between
two polls and, as the client moves its cursor, nothing is duplicated.

The outbox is bounded (``LONGPOLL_OUTBOX_BYTES``, 128 KiB): a client that
stops polling while publications arrive is closed as a slow consumer (4001).
A user holds at most ``LONGPOLL_MAX_PER_USER`` open sessions (429 past it), a
process ``MAX_LONGPOLL_SESSIONS`` (503), counted apart from the sockets.

A session not polled for ``LONGPOLL_IDLE`` seconds (60) is closed and its memory released. A
closed session answers ``410`` with ``{"close": {"code": …}}`` and the
messages still unacknowledged.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import msgspec

from core.infra.errors import ApiError
from core.infra.identity import Identity, principal
from gateway.context import Context
from gateway.endpoints import JsonHandler
from gateway.hooks.connect import Disconnected, hooked
from gateway.transport.admission import admit, admit_hooked_request
from gateway.transport.pollrequest import token_of
from gateway.transport.pollsessions import PollSession
from gateway.transport.wsconn import FRAMES_PER_TURN
from proto import JSON_CODEC

__all__ = ["SESSION_SECRET_PREFIX", "LongPollHandler"]

#: Starts the secret of a session admitted without a token (by the connect hook).
SESSION_SECRET_PREFIX = "gwlp_"

_frames = msgspec.json.Decoder(list[msgspec.Raw])


def _session(poll: PollSession | None) -> PollSession:
    if poll is None:
        raise ApiError(404, "not_found", "no such long-poll session")
    return poll


class LongPollHandler(JsonHandler):
    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    async def prepare(self) -> None:
        # Making a session is a new connection; its polls and sends are not.
        ctx, request = self.ctx, self.request
        self.goodbye: Disconnected | None = None
        self.secret: str | None = None
        is_new = request.method == "POST" and self.path_args == []
        if not is_new and ctx.hooks is not None:
            known = self._known()
            if known is not None:
                self.identity = known
                return
        identity = await admit(self, ctx, new_connection=is_new)
        if is_new and ctx.hooks is not None and ctx.hooks.connect is not None:
            try:
                identity = await admit_hooked_request(self, ctx, identity, PollSession.kind)
            except Disconnected as goodbye:
                self.goodbye = goodbye
                return
            if identity.token is None:
                # Admitted without a token (by its cookies): the session's own secret
                # authenticates its later requests, as a token would.
                self.secret = SESSION_SECRET_PREFIX + secrets.token_urlsafe(32)
        assert identity is not None  # without a connect hook, a token is required
        self.identity = identity

    def _known(self) -> Identity | None:
        """The identity of a hooked session whose secret (or token) the request carries."""
        if self.ctx.status.draining:
            return None  # answered 503 by admission
        found = self.ctx.longpoll.find(self.path_args[0]) if self.path_args else None
        token = token_of(self.request.headers.get("Authorization"), self.request.query)
        if found is None or not token.startswith(SESSION_SECRET_PREFIX):
            return None
        if not found[1].holds(token, time.time(), self.ctx.verifier.revoked):
            return None
        return found[1].identity

    async def post(self, sid: str | None = None) -> None:
        ctx = self.ctx
        sessions = ctx.longpoll
        if sid is None and self.goodbye is not None:
            # The connect hook's disconnect: the session ends as it starts, as a closed one answers.
            close = {"code": self.goodbye.code, "reason": self.goodbye.reason}
            self.write_json({"messages": [], "cursor": 0, "close": close}, 410)
            return
        if sid is None:
            refusal = sessions.refusal(principal(self.identity))
            if refusal == "user":
                ctx.metrics.handshake_failures.labels("longpoll_per_user").inc()
                raise ApiError(429, "rate_limited", f"at most {sessions.max_per_user} open "
                               "long-poll sessions per user", headers={"Retry-After": "5"})  # fmt: skip
            if refusal == "process":
                ctx.metrics.handshake_failures.labels("longpoll_capacity").inc()
                raise ApiError(
                    503, "unavailable", "too many long-poll sessions", headers={"Retry-After": "5"}
                )
            poll = PollSession(secrets.token_urlsafe(16), ctx.settings.longpoll_outbox_bytes,
                               sessions.waits)  # fmt: skip
            poll.session = ctx.open_session(
                poll, JSON_CODEC, self.identity, self.request.remote_ip or ""
            )
            poll.session.open()
            sessions.add(principal(self.identity), poll)
            opened: dict[str, object] = {"session": poll.sid, "cursor": 0}
            if self.secret is not None:
                # Never expires by itself: the session closes when its identity does.
                client = poll.session.client_id
                poll.remember(self.secret, hooked(self.identity, client, keep_exp=False))
                opened["token"] = self.secret
            boot = poll.session.boot()
            if boot is not None:
                await boot
            self.write_json(opened, 201)
            return
        poll = _session(sessions.get(sid, principal(self.identity)))
        if poll.closed is not None or poll.session is None:
            raise ApiError(410, "gone", "this long-poll session is closed")
        try:
            frames = _frames.decode(self.request.body)
        except msgspec.DecodeError as exc:
            raise ApiError(400, "malformed_json", f"send a JSON array of frames: {exc}") from None
        except RecursionError:  # nested beyond what the decoder follows
            raise ApiError(400, "malformed_json", "request body is nested too deeply") from None
        session, accepted = poll.session, 0
        for frame in frames:
            if poll.closed is not None:  # by a frame of this body (4503), or meanwhile
                break
            if accepted and not accepted % FRAMES_PER_TURN:
                await asyncio.sleep(0)  # as a socket's: the process's other clients run between
            await session.handle(bytes(frame))
            accepted += 1
        self.write_json({"accepted": accepted}, 202)

    def on_connection_close(self) -> None:
        return None  # the outbox keeps what this poll would have carried
