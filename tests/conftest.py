import os

import pytest


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
