import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_onnx_cache(tmp_path_factory):
    """Graphs exported by `--runtime auto` (lib/runtimes) go to a temporary folder, not to the
    user's ~/.cache; subprocesses inherit the variable."""
    previous = os.environ.get("BISENET_CACHE")
    os.environ["BISENET_CACHE"] = str(tmp_path_factory.mktemp("bisenet_cache"))
    yield
    if previous is None:
        del os.environ["BISENET_CACHE"]
    else:
        os.environ["BISENET_CACHE"] = previous


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
