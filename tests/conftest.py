"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on
before any kernel module is imported; this file is loaded by pytest before every test module.

Tests that compare with torchvision are marked `@pytest.mark.torchvision`. The package does not
depend on torchvision, so they skip where it is not installed; `make test` runs them a second
time in an environment that has it (.venv-tv), with MRCNN_REQUIRE_TORCHVISION=1, under which a
marked test that skips, or finds no torchvision, fails instead. A test that skips for want of
torchvision without the mark fails everywhere: the second run would never see it.
"""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

REQUIRE_TORCHVISION = os.environ.get("MRCNN_REQUIRE_TORCHVISION", "") not in ("", "0")


@functools.cache
def _torchvision_import_error() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # an ImportError, or a torchvision built for another torch
        return f"{type(error).__name__}: {error}"
    return None


def pytest_runtest_setup(item):
    if REQUIRE_TORCHVISION and item.get_closest_marker("torchvision") and _torchvision_import_error():
        pytest.fail(f"MRCNN_REQUIRE_TORCHVISION=1, but torchvision does not import: {_torchvision_import_error()}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip that would hide a torchvision comparison from both of make test's runs is a failure."""
    report = (yield).get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    marked = item.get_closest_marker("torchvision") is not None
    if marked and REQUIRE_TORCHVISION:
        report.outcome = "failed"
        report.longrepr = f"a torchvision comparison skipped under MRCNN_REQUIRE_TORCHVISION=1: {reason}"
    elif not marked and "torchvision" in reason:
        report.outcome = "failed"
        report.longrepr = (f"skipped for want of torchvision ({reason}), but not marked @pytest.mark.torchvision, "
                           "so make test's run with torchvision (pytest -m torchvision) leaves it out: mark it")


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
