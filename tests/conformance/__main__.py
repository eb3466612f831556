"""``python -m tests.conformance``: every case against the gateway and the reference.

Starts both servers as processes (the gateway on ``DATABASE_URL``, default
``postgresql://127.0.0.1:5432/test``, or a throwaway PostgreSQL when that does
not answer), runs every case against each and prints a Markdown table per
group: cases, passed against the gateway, passed against the reference, and
the ids that fail. ``--verbose`` adds each failure's detail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator

from tests.conformance.cases import CASES, GROUPS, Case
from tests.conformance.known import GATEWAY_FAILS
from tests.conformance.processes import gateway_process, reference_process
from tests.conformance.runner import Verdict, run_cases
from tests.servers import DEFAULT_DATABASE_URL, ensure_postgres, postgres_dir


def _ids(verdicts: list[Verdict]) -> str:
    return ", ".join(v.case for v in verdicts if not v.passed) or "-"


@contextlib.contextmanager
def _database() -> Iterator[str]:
    with postgres_dir() as directory:
        url, server = ensure_postgres(
            os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL, directory
        )
        try:
            yield url
        finally:
            if server is not None:
                server.stop()


def report(cases: list[Case], gateway: list[Verdict], reference: list[Verdict]) -> list[str]:
    lines = [
        "| group | cases | gateway passes | reference passes | failing against the gateway "
        "| failing against the reference |",
        "|---|---:|---:|---:|---|---|",
    ]
    for group, name in GROUPS.items():
        idx = [i for i, c in enumerate(cases) if c.group == group]
        gw = [gateway[i] for i in idx]
        ref = [reference[i] for i in idx]
        lines.append(
            f"| {group} {name} | {len(idx)} | {sum(v.passed for v in gw)} | "
            f"{sum(v.passed for v in ref)} | {_ids(gw)} | {_ids(ref)} |"
        )
    lines.append(
        f"| all | {len(cases)} | {sum(v.passed for v in gateway)} | "
        f"{sum(v.passed for v in reference)} | | |"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="print each failure's detail")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="connections at a time (default 4)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    with _database() as url:
        with gateway_process(url) as (_, target):
            gateway = asyncio.run(run_cases(CASES, target, args.concurrency))
        with reference_process() as (_, target):
            reference = asyncio.run(run_cases(CASES, target, args.concurrency))
    print("\n".join(report(CASES, gateway, reference)))
    ref_exempt = sum(1 for c in CASES if c.reference is not None)
    print(
        f"\n{len(CASES)} cases in {time.monotonic() - started:.0f} s; {ref_exempt} not held against the "
        f"reference (each with its reason in tests/conformance/cases.py)"
    )
    unexpected = [v for v in gateway if not v.passed and v.case not in GATEWAY_FAILS]
    fixed = [v for v in gateway if v.passed and v.case in GATEWAY_FAILS]
    if fixed:
        print(
            "now passing against the gateway (remove from tests/conformance/known.py): "
            + ", ".join(v.case for v in fixed)
        )
    if unexpected:
        print("failing against the gateway and not known: " + ", ".join(v.case for v in unexpected))
    if args.verbose:
        for name, verdicts in (("gateway", gateway), ("reference", reference)):
            for v in verdicts:
                if not v.passed:
                    print(f"{name} {v.case}: {v.detail}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
