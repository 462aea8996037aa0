import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, saying why, where there is no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
