"""Benchmark session: collects result records and, with --save-results, writes them in the
bench/results format."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402

RECORDS: list = []


def pytest_addoption(parser):
    parser.addoption("--save-results", action="store_true",
                     help="write the measurements to bench/results/<device>/")


@pytest.fixture(scope="session")
def records():
    return RECORDS


def pytest_sessionfinish(session, exitstatus):
    if RECORDS and session.config.getoption("--save-results"):
        path = results.write(RECORDS, "kernels")
        print(f"\nresults written to {path}")
