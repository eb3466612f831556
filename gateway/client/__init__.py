"""An asyncio client of the gateway's socket protocol (v1), for backends, bots and tests.

```python
from gateway.client import Client, Gap

async with Client("ws://127.0.0.1:8888/ws", token=token, get_token=fetch_token) as gw:
    sub = await gw.subscribe("projects")
    status, headers, body = await gw.rpc("GET", "/api/projects?limit=5")
    async for event in sub:
        if isinstance(event, Gap):
            ...  # missed publications that could not be recovered: reload the state
        else:
            print(event.channel, event.offset, event.data)
```

It reconnects by itself with exponential backoff and full jitter for the
close codes that `proto.should_reconnect` allows, resubscribes every channel
with ``since`` = its last position (history channels replay what was
missed; otherwise the subscription yields a `Gap`), refreshes its token in
band when the gateway pushes ``expiring``, and gives every command an id, a
future and a timeout. Frames are proto's types, JSON by default or
MessagePack (``encoding="msgpack"``).

The socket is the `websockets` library's asyncio client, adapted in
`gateway.client.transport` (which says why); the long-poll fallback carries
the same frames where upgrades do not pass. See docs/clients.md.
"""

from core.infra.backoff import Backoff
from gateway.client.client import Client, HistoryPage, PresenceCount, RpcResponse
from gateway.client.exceptions import (
    ClientError,
    ConnectionClosed,
    HandshakeError,
    ReplyError,
    SubscriptionEnded,
)
from gateway.client.link import TRANSITIONS, State, StateError
from gateway.client.subscription import Event, Gap, GapReason, Publication, Subscription
from proto import Join, Leave, Position, PresenceInfo

__all__ = [
    "TRANSITIONS",
    "Backoff",
    "Client",
    "ClientError",
    "ConnectionClosed",
    "Event",
    "Gap",
    "GapReason",
    "HandshakeError",
    "HistoryPage",
    "Join",
    "Leave",
    "Position",
    "PresenceCount",
    "PresenceInfo",
    "Publication",
    "ReplyError",
    "RpcResponse",
    "State",
    "StateError",
    "Subscription",
    "SubscriptionEnded",
]
