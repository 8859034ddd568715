"""The suite's fixtures. The helpers they build on, and every other shared helper, live in tests/support.py."""

from __future__ import annotations

import zlib

import pytest
import torch

try:
    from support import one_cpu_thread
except ImportError:  # tests/ turned into a package
    from tests.support import one_cpu_thread


@pytest.fixture(autouse=True)
def _seed_per_case(request):
    """A fresh, reproducible random stream for every test case (seeded by the test id, so cases differ)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def single_cpu_thread():
    """One intra-op thread for the test (support.one_cpu_thread); modules of tiny models opt in with
    `pytestmark = pytest.mark.usefixtures("single_cpu_thread")`."""
    with one_cpu_thread():
        yield
