"""A chat bot: joins ``chat:lobby``, greets who comes, answers, and shows presence.

Messages on the channel are ``{"from": <name>, "text": <text>}``. The bot
welcomes each newcomer (``join`` events), answers ``!who`` with who is
present and ``!count`` with how many, and says hello to anyone who says its
name. Presence needs the gateway to keep it for the channel::

    PRESENCE_CHANNELS='chat:*' make run
    export GATEWAY_TOKEN=$(.venv/bin/python -m gateway token --sub bot --channels 'chat:*')
    GATEWAY_URL=ws://127.0.0.1:8888/ws .venv/bin/python examples/chat_bot.py
"""

from __future__ import annotations

import asyncio
import logging
import os

from gateway.client import Client, Join, Leave, Publication

__all__ = ["CHANNEL", "NAME", "answer", "main"]

log = logging.getLogger("chat_bot")

NAME = "bot"
CHANNEL = "chat:lobby"


async def answer(gw: Client, text: str, sender: str) -> str | None:
    """The bot's answer to ``text`` from ``sender``, or None to stay quiet."""
    if text.strip() == "!who":
        present = await gw.presence(CHANNEL)
        return "here: " + ", ".join(sorted({p.user for p in present}))
    if text.strip() == "!count":
        clients, users = await gw.presence_stats(CHANNEL)
        return f"{users} people on {clients} connections"
    if NAME in text.lower():
        return f"hello {sender}"
    return None


async def main(url: str, token: str) -> None:
    async with Client(url, token=token) as gw:
        lobby = await gw.subscribe(CHANNEL)
        log.info("in %s", CHANNEL)
        async for event in lobby:
            reply: str | None = None
            if isinstance(event, Join) and event.info.user != NAME:
                reply = f"welcome, {event.info.user}"
            elif isinstance(event, Leave):
                log.info("%s left", event.info.user)
            elif isinstance(event, Publication) and isinstance(event.data, dict):
                sender = str(event.data.get("from", "?"))
                if sender != NAME:
                    reply = await answer(gw, str(event.data.get("text", "")), sender)
            if reply is not None:
                await gw.publish(CHANNEL, {"from": NAME, "text": reply})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = os.environ.get("GATEWAY_URL", "ws://127.0.0.1:8888/ws")
    asyncio.run(main(url, os.environ["GATEWAY_TOKEN"]))
