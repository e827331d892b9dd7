import os

import pytest
import torch

# Tests share one token cache per session so the built-in corpus is tokenized once: the checkout's
# .cache/ (ignored by git), or MOEBALANCE_TEST_CACHE. Never the user's MOEBALANCE_CACHE: a test
# must not write into the cache a user's own runs read.
os.environ["MOEBALANCE_CACHE"] = os.environ.get("MOEBALANCE_TEST_CACHE") or os.path.join(
    os.path.dirname(__file__), "..", ".cache", "moebalance"
)


@pytest.fixture(scope="module")
def one_thread():
    """Torch at one thread for a module's tests (tiny models: threads only add contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dist_job(tmp_path_factory):
    """Folder with the results of the one shared 2-rank gloo job (see distributed_helpers.py)."""
    from distributed_helpers import run_shared_job

    out = tmp_path_factory.mktemp("dist_job")
    run_shared_job(str(out))
    return out
