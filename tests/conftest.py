"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on
before any kernel module is imported; this file is loaded by pytest before every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: small tensors gain little from a second, and on a shared
    2-core machine it mostly waits. Modules whose every test wants it say
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
