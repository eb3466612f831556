"""WebSocket conformance (issue 14): every case against a real gateway process.

The cases, their expected verdicts and the raw client are in
tests/conformance/ (``python -m tests.conformance`` prints the per-group
table, docs/conformance.md). Here each case is one test against one
``python -m gateway`` shared by the module; cases the gateway fails today
are ``xfail(strict=True)`` with what it does wrong (tests/conformance/known.py),
so a fix that lands shows up as a strict failure until its entry is removed.

The calibration tests run the same cases against the reference server
(`websockets`, its own process): every calibrated case must pass there, and
every case exempted from it must really fail there (so an exemption
cannot outlive its reason).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conformance.cases import CASES, GROUPS, Case, Target
from tests.conformance.known import GATEWAY_FAILS
from tests.conformance.processes import ServerProcess, gateway_process, reference_process
from tests.conformance.runner import run_case, run_cases


def _param(case: Case) -> object:
    reason = GATEWAY_FAILS.get(case.id)
    marks = [] if reason is None else [pytest.mark.xfail(strict=True, reason=reason)]
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def gateway(database_url: str) -> Iterator[tuple[ServerProcess, Target]]:
    with gateway_process(database_url) as server:
        yield server


@pytest.fixture(scope="module")
def reference() -> Iterator[tuple[ServerProcess, Target]]:
    with reference_process() as server:
        yield server


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_gateway(case: Case, gateway: tuple[ServerProcess, Target]) -> None:
    verdict = await run_case(case, gateway[1])
    assert verdict.passed, f"{case.id} {case.title}: {verdict.detail}"


async def test_gateway_still_serves_after_the_suite(gateway: tuple[ServerProcess, Target]) -> None:
    """Nothing the suite sent stopped the process or its event loop."""
    proc, target = gateway
    assert proc.alive, proc.output()[-2000:]
    verdict = await run_case(next(c for c in CASES if c.id == "H.1"), target)
    assert verdict.passed, verdict.detail
    assert "Traceback" not in proc.output(), proc.output()[-4000:]


@pytest.mark.parametrize("group", list(GROUPS))
async def test_reference_passes_every_calibrated_case(
    group: str, reference: tuple[ServerProcess, Target]
) -> None:
    cases = [c for c in CASES if c.group == group and c.reference is None]
    verdicts = await run_cases(cases, reference[1], concurrency=8)
    failed = [f"{v.case}: {v.detail}" for v in verdicts if not v.passed]
    assert not failed, "the reference fails calibrated cases:\n" + "\n".join(failed)


async def test_reference_fails_every_exempted_case(reference: tuple[ServerProcess, Target]) -> None:
    cases = [c for c in CASES if c.reference is not None]
    assert cases
    verdicts = await run_cases(cases, reference[1], concurrency=8)
    passed = [v.case for v in verdicts if v.passed]
    assert not passed, f"exempted from the reference but passing there (calibrate them): {passed}"


def test_case_ids_are_unique_and_known_failures_name_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert set(GATEWAY_FAILS) <= set(ids)
    assert all(reason.startswith("issue ") for reason in GATEWAY_FAILS.values())


def test_the_suite_is_the_size_issue_14_asks_for() -> None:
    assert 150 <= len(CASES) <= 350  # issue 14 asked for 150-300; issue 20 added 50 (12, 13)
    assert {c.group for c in CASES} == set(GROUPS)
