"""The suite's fixtures. The helpers they build on, and every other shared helper, live in tests/support.py."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Without a GPU the kernels run on CPU tensors under triton's interpreter, which applies to what triton decorates
# after the switch is set: the kernels, and triton's own library functions (tl.sum and the like) when triton is
# first imported. Set here, before any test module imports triton, so that which test file happens to be collected
# first (tests/test_model.py imports triton too) cannot leave the interpreter tests calling compiled helpers. With a
# GPU the compiled kernels run and tests/test_kernels_interpreter.py skips itself.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
