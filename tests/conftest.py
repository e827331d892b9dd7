import os

import pytest
import torch

# Tests share one token cache per session so the built-in corpus is tokenized once.
os.environ.setdefault("MOEBALANCE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "moebalance"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
