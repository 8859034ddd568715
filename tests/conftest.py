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
def persistent_launches(monkeypatch):
    """Route every layer the persistent kernels apply to through them (FASTLSTM_PERSISTENT=on; host-stepped under
    the interpreter) and record the kernel of each of their launches."""
    from fastlstm.kernels import launch  # only here: the interpreter tests must set TRITON_INTERPRET first

    monkeypatch.setattr(launch, "PERSISTENT", "on")
    calls = []
    original = launch._launch_persistent
    monkeypatch.setattr(launch, "_launch_persistent", lambda kernel, *a: calls.append(kernel) or original(kernel, *a))
    return calls


@pytest.fixture
def single_cpu_thread():
    """One intra-op thread for the test (support.one_cpu_thread); modules of tiny models opt in with
    `pytestmark = pytest.mark.usefixtures("single_cpu_thread")`."""
    with one_cpu_thread():
        yield
