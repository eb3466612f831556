"""``python -m core serve`` bound with ``SO_REUSEPORT``, so that bench/proxy.py runs two on a port.

``python -m core`` is one process: it does not read ``WORKERS`` (that is
the gateway's, gateway/workers.py) and binds its port without
``SO_REUSEPORT`` (core/server.py), so a second core process cannot listen
on the same port. The gateway takes one ``CORE_URL``. To put two core
processes behind one gateway with nothing else in between, this runs the
core exactly as ``python -m core serve`` does, with one difference: its
socket is bound with ``reuse_port=True``. Every process started this way on
one port then has its own listening socket, and the kernel spreads new
connections (here the gateway's pooled keep-alive connections) over them by
a hash of their addresses, much as a Kubernetes Service spreads them over
pods. Nothing of the core's request path changes.

Usage (each process on the same ``PORT``, with the core's usual environment)::

    PORT=8081 DATABASE_URL=... .venv/bin/python -m bench.sharedport &
    PORT=8081 DATABASE_URL=... .venv/bin/python -m bench.sharedport &
"""

from __future__ import annotations

import functools
import sys

from tornado.netutil import bind_sockets

import core.server
from core.__main__ import main

if __name__ == "__main__":
    core.server.bind_sockets = functools.partial(bind_sockets, reuse_port=True)
    sys.exit(main(["serve"]))
