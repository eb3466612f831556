"""tests/marks.py: which tests `make test-fast` leaves out, and keeping that table honest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.marks import apply_marks, slow_keys


class FakeItem:
    """What apply_marks reads of a pytest item, and the marks it is given."""

    def __init__(self, nodeid: str, *fixtures: str, params: dict[str, object] | None = None):
        self.nodeid = nodeid
        self.path = Path(nodeid.split("::", 1)[0])
        self.fixturenames = list(fixtures)
        if params is not None:
            self.callspec = type("CallSpec", (), {"params": params})()
        self.marks: list[str] = []

    def add_marker(self, name: str) -> None:
        self.marks.append(name)


def test_tests_are_marked_by_module_name_fixture_and_broker():
    items = [
        FakeItem("tests/test_deploy.py::test_anything[x]"),
        FakeItem("tests/test_browser.py::test_anything"),
        FakeItem("tests/test_readme.py::test_the_tour_runs_as_written"),
        FakeItem("tests/test_new.py::test_with_processes", "processes"),
        FakeItem("tests/test_new.py::test_contract[cluster]", params={"broker_factory": "cluster"}),
        FakeItem("tests/test_new.py::test_contract[memory]", params={"broker_factory": "memory"}),
        FakeItem("tests/test_new.py::test_plain"),
        FakeItem("tests/test_new.py::test_on_hosts", "network"),
    ]
    apply_marks(items, whole_suite=False)
    assert [item.marks for item in items] == [
        ["deploy"],
        ["browser", "e2e"],
        ["e2e", "slow"],  # and measured slow: tests/slow.txt
        ["e2e"],
        ["slow"],
        [],
        [],
        ["netfault", "e2e", "slow"],  # tests/netns.py: hosts in network namespaces
    ]


def test_a_whole_run_refuses_a_table_naming_tests_that_do_not_exist():
    items = [FakeItem("tests/test_new.py::test_plain")]
    apply_marks(items, whole_suite=False)  # a run of some tests only: the rest is elsewhere
    with pytest.raises(
        pytest.UsageError, match=re.escape("test_readme.py::test_the_tour_runs_as_written")
    ):
        apply_marks(items, whole_suite=True)


def test_slow_keys_add_up_setup_call_and_teardown_over_the_bound():
    report = """
============================= slowest durations ==============================
0.20s call     tests/test_a.py::test_x
0.10s setup    tests/test_a.py::test_x
0.20s call     tests/test_a.py::test_y[fast]
0.30s call     tests/test_a.py::test_y[slow one]
0.40s call     tests/test_a.py::test_z[\\x80\\x93-1002]
(12 durations < 0.005s hidden.  Use -vv to show these durations.)
"""
    assert slow_keys(report, 0.25) == [
        "test_a.py::test_x",
        "test_a.py::test_y[slow one]",
        "test_a.py::test_z",  # random bytes in its id: named without its parameters
    ]
