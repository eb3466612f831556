"""What an open socket holds for the cyclic collector to walk (issue 21, connects per second).

Every full collection walks every object a live socket keeps; under a
burst of connections there are several. A socket's own objects are its
`WSConnection`, the event loop's transport, its `Session`, the protocol
state (`WebSocketProtocol`, `proto.Connection`) and its `Identity`: no
closure of the handshake, no bound method or rate-limit object of its own.
"""

from __future__ import annotations

import gc

from gateway.session import Session
from gateway.transport.wsconn import WSConnection
from tests.harness import running_gateway, token_for, until, ws_client


def _own(obj: object, other: object) -> list[str]:
    """The type names of the tracked objects ``obj`` refers to and ``other`` does not."""
    shared = {id(o) for o in gc.get_referents(other)}
    return sorted(
        type(o).__name__
        for o in gc.get_referents(obj)
        if gc.is_tracked(o) and id(o) not in shared and not isinstance(o, type)
    )


async def test_an_open_socket_holds_only_its_own_few_objects():
    async with running_gateway() as gw:
        alice, bob = token_for(gw, "alice"), token_for(gw, "bob")  # two identities
        async with ws_client(gw.port, alice) as a, ws_client(gw.port, bob) as b:
            await a.request("sub", ch="room:1")
            await b.request("sub", ch="room:1")
            hub = gw.ctx.node.hub
            await until(lambda: hub.connection_count() == 2)
            first, second = (s for s in hub.connections if isinstance(s, Session))
            ws1, ws2 = first.transport, second.transport
            assert isinstance(ws1, WSConnection) and isinstance(ws2, WSConnection)
            assert ws1._make_session is None  # the handshake's closure is gone
            assert first.dispatch is second.dispatch and first.verify is second.verify
            assert _own(first, second) == ["Connection", "Identity", "WSConnection"]
            transport = type(ws1.transport).__name__
            assert _own(ws1, ws2) == sorted(["Session", "WebSocketProtocol", transport])
