"""Identifiers that must be unique but need not be secret, with no system call each.

Request ids and history epochs are sent to clients, so nothing is lost if
one is guessed (a caller may even choose its request id); ``secrets``
would cost a ``getrandom`` system call each, once or twice per request.
They come from a generator of their own, seeded by the OS and seeded again
in every forked process (so two workers never draw the same sequence);
being its own, its outputs tell nothing about the ``random`` module's
other users (backoff jitter).
"""

from __future__ import annotations

import os
import random
import re

__all__ = ["request_id_of", "unique_hex"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

_generator = random.Random()
os.register_at_fork(after_in_child=_generator.seed)


def unique_hex(digits: int) -> str:
    """``digits`` lowercase hexadecimal digits, unpredictable enough to be unique."""
    return f"{_generator.getrandbits(4 * digits):0{digits}x}"


def request_id_of(given: str) -> str:
    """The caller's ``X-Request-Id`` when it is a sane one, else a new one.

    Every answer carries one (the core's, the gateway's, their error pages):
    what a client quotes when it reports a failure, and what the logs hold.
    """
    return given if given and _REQUEST_ID.fullmatch(given) else unique_hex(16)
