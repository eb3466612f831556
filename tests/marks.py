"""Which tests are ``browser``, ``deploy``, ``e2e``, ``netfault`` or ``slow``: one table, applied
at collection.

``make test-fast`` runs ``-m "not browser and not deploy and not slow and not e2e"`` (the
edit-test loop, under a minute); ``make test`` runs everything. The marks (registered in
setup.cfg, strict):

* ``browser``: drives a real browser (playwright);
* ``deploy``: checks the deployment files with outside tools (hadolint, kubernetes-validate);
* ``e2e``: runs the gateway (or the core, or ``make run``, or the load tool) as real processes.
  A test using one of ``E2E_FIXTURES`` is marked without being listed;
* ``netfault``: builds hosts in network namespaces (tests/netns.py): whoever uses one of
  ``NETFAULT_FIXTURES`` is marked ``netfault``, ``e2e`` and ``slow``;
* ``slow``: those using the Redis Cluster, and the tests listed in ``tests/slow.txt``: measured
  over ``SLOW_SECONDS`` (setup and teardown included) in a whole run on the shared machine.
  When ``make test-fast`` nears a minute, or a new test is slow, measure again::

      .venv/bin/python -m pytest -p no:cacheprovider --durations=0 > durations.log
      .venv/bin/python -m tests.marks durations.log > tests/slow.txt

A key is a module (``test_x.py``), a test (``test_x.py::test_y``: all its parameters) or one
parametrization (``test_x.py::test_y[z]``). When the whole suite is collected, a key that names
no test is an error, so the table cannot silently outlive a rename.

The marks live here rather than on the tests so that one place says what the fast loop leaves
out, and so that marking needs no edit to the tests' files.
"""

from __future__ import annotations

import collections
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

__all__ = ["E2E_FIXTURES", "MARKS", "NETFAULT_FIXTURES", "SLOW_SECONDS", "apply_marks", "slow_keys"]

#: What a test may take, setup and teardown included, before it is ``slow``: far below the
#: ~2 s one would expect, because on the shared 2-core machine (load 5 to 9 from other
#: engineers' runs) everything takes about 3 times as long as on an idle one, and the fast run
#: must stay under a minute there (it took 25 to 65 s with this bound).
SLOW_SECONDS = 0.25
SLOW_LIST = Path(__file__).with_name("slow.txt")

#: Fixtures that start gateway processes: whoever uses them is ``e2e``.
E2E_FIXTURES = frozenset({"processes", "spawn", "two_processes"})
#: Fixtures that build a network of hosts in namespaces (tests/test_netfault.py).
NETFAULT_FIXTURES = frozenset({"network"})
#: Whoever uses the Redis Cluster (three redis-server processes, seconds to start) is ``slow``.
CLUSTER = "redis_cluster"

_DEPLOY = ("deploy",)
_E2E = ("e2e",)

MARKS: dict[str, tuple[str, ...]] = {
    # -- browser, deploy ---------------------------------------------------------------------
    "test_browser.py": ("browser", "e2e"),
    "test_console.py": ("browser", "e2e"),
    "test_deploy.py": _DEPLOY,
    "test_proxy.py": _E2E,
    # -- e2e: real processes, beyond those using E2E_FIXTURES ---------------------------------
    "test_bench_proxy.py": _E2E,  # the gateway, the core, wrk and bench/rpcload.py
    "test_accept.py::test_out_of_file_descriptors_pauses_accept_with_bounded_logs_then_serves_again": _E2E,
    "test_loadtest.py::test_every_transport_is_loaded_timed_and_counted": _E2E,
    "test_loadtest.py::test_refused_connections_and_lost_messages_fail_the_run": _E2E,
    "test_loadtest.py::test_many_channels_each_socket_gets_each_publication_exactly_once": _E2E,
    "test_loadtest.py::test_a_killed_gateways_sockets_reconnect_to_another_and_recover_late_not_lost": _E2E,
    "test_loadtest.py::test_what_recovery_cannot_bring_back_is_reported": _E2E,
    "test_conformance.py": _E2E,
    "test_fuzz.py::test_random_bytes_on_fresh_sockets_never_stop_the_gateway": _E2E,
    "test_fuzz.py::test_the_bystander_is_still_served_after_the_fuzzing": _E2E,
    "test_migrate_on_start.py": _E2E,
    "test_publication.py::test_poison_from_another_process_or_redis_silences_no_one": _E2E,
    "test_readme.py::test_the_tour_runs_as_written": _E2E,
    "test_workers.py::test_workers_that_die_at_start_again_and_again_stop_the_gateway": _E2E,
}
for _key in SLOW_LIST.read_text().splitlines():
    MARKS[_key] = (*MARKS.get(_key, ()), "slow")


def _keys(item: pytest.Item) -> tuple[str, str, str]:
    module = item.path.name
    test = item.nodeid.split("::", 1)[1]
    return module, f"{module}::{test.split('[', 1)[0]}", f"{module}::{test}"


def apply_marks(items: Iterable[pytest.Item], whole_suite: bool) -> None:
    """Add the table's marks to ``items``; with ``whole_suite``, refuse keys naming no test."""
    used: set[str] = set()
    for item in items:
        names: list[str] = []
        for key in _keys(item):
            if key in MARKS:
                used.add(key)
                names.extend(MARKS[key])
        fixtures = getattr(item, "fixturenames", ())
        if E2E_FIXTURES.intersection(fixtures):
            names.append("e2e")
        if NETFAULT_FIXTURES.intersection(fixtures):
            names.extend(("netfault", "e2e", "slow"))
        callspec = getattr(item, "callspec", None)
        if CLUSTER in fixtures or (callspec and callspec.params.get("broker_factory") == "cluster"):
            names.append("slow")
        for name in dict.fromkeys(names):
            item.add_marker(name)
    stale = sorted(set(MARKS) - used)
    if whole_suite and stale:
        raise pytest.UsageError(
            f"tests/marks.py or tests/slow.txt names tests that do not exist: {stale}"
        )


def slow_keys(durations: str, seconds: float = SLOW_SECONDS) -> list[str]:
    """The tests of a ``pytest --durations=0`` report that took over ``seconds``, as keys.

    A parameter id with escaped bytes (``\\x80``) is made of random bytes and changes from one
    run to the next: such a test is named without its parameters.
    """
    spent: dict[str, float] = collections.defaultdict(float)
    for line in durations.splitlines():
        found = re.match(r"([\d.]+)s (?:setup|call|teardown) +tests/(\S.*)$", line.strip())
        if found:
            spent[found[2]] += float(found[1])
    slow = [test for test, total in spent.items() if total > seconds]
    return sorted({test.split("[", 1)[0] if "\\" in test else test for test in slow})


if __name__ == "__main__":
    print("\n".join(slow_keys(Path(sys.argv[1]).read_text())))
