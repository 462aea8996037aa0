import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import cpu_description

from lib.data.toy_cityscapes import generate_toy_cityscapes


@pytest.fixture(autouse=True, scope="session")
def _private_onnx_cache(tmp_path_factory):
    """Graphs exported by `--runtime auto` (lib/deployment/runtimes) go to a temporary folder,
    not to the user's ~/.cache; subprocesses inherit the variable."""
    previous = os.environ.get("BISENET_CACHE")
    os.environ["BISENET_CACHE"] = str(tmp_path_factory.mktemp("bisenet_cache"))
    yield
    if previous is None:
        del os.environ["BISENET_CACHE"]
    else:
        os.environ["BISENET_CACHE"] = previous


@pytest.fixture(autouse=True)
def _restore_sigchld_handler():
    """Each test leaves the SIGCHLD handler as it found it. torch's DataLoader with workers
    installs one in the process for good; a later test's subprocess exiting then ran it, which
    crashed the test process (SIGSEGV) once OpenVINO was loaded in it (test_decoded_cache, then
    test_demo)."""
    previous = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, previous)


@pytest.fixture
def one_thread():
    """PyTorch on one thread for the test: a tiny input runs short and steady on a busy machine,
    and a CPU convolution's rounding depends on how many threads split its sums, so a test that
    compares with a one-thread process (torchrun's ranks) computes on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_toy(tmp_path_factory) -> Callable[..., Path]:
    """``make_toy(n_train, n_val, height, width)``: a toy Cityscapes of that size, written once
    per session (tests only read it)."""
    made: dict[tuple[int, int, int, int], Path] = {}

    def make(n_train: int = 6, n_val: int = 2, height: int = 64, width: int = 128) -> Path:
        key = (n_train, n_val, height, width)
        if key not in made:
            made[key] = generate_toy_cityscapes(tmp_path_factory.mktemp("toy"), n_train=n_train,
                                                n_val=n_val, height=height, width=width)
        return made[key]

    return make


@pytest.fixture(scope="session")
def toy_root(make_toy) -> Path:
    """The common small toy Cityscapes: 6 training and 2 validation images of 64x128."""
    return make_toy()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_report_header(config) -> list[str]:
    return [f"cpu: {cpu_description()}",
            f"torch {torch.__version__} (CPU kernels: {torch.backends.cpu.get_cpu_capability()}), "
            f"CUDA available: {torch.cuda.is_available()}"]
