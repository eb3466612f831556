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

__all__ = ["unique_hex"]

_generator = random.Random()
os.register_at_fork(after_in_child=_generator.seed)


def unique_hex(digits: int) -> str:
    """``digits`` lowercase hexadecimal digits, unpredictable enough to be unique."""
    return f"{_generator.getrandbits(4 * digits):0{digits}x}"
