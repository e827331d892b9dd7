"""The development set-up (issue 22): the Makefile's PyTorch index is a choice that changes nothing
by default, and tests never write into the user's token cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_torch_index_is_one_variable_and_off_by_default(tmp_path):
    def install_line(*extra: str) -> str:
        dry = subprocess.run(
            ["make", "-n", "-B", "demo", f"VENV={tmp_path / 'v'}", *extra], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        return next(ln for ln in dry.splitlines() if "pip install" in ln and "torch==" in ln)

    assert install_line().split() == [str(tmp_path / "v" / "bin" / "pip"), "install", "-q", "torch==2.13.0"]
    index = "https://download.pytorch.org/whl/cpu"
    assert install_line(f"TORCH_INDEX={index}").split()[-2:] == ["--index-url", index]
    readme = (ROOT / "README.md").read_text()
    assert f"TORCH_INDEX={index}" in readme and "CUDA build" in readme


def test_tests_never_use_the_users_cache(tmp_path):
    users = tmp_path / "users-cache"
    code = "import os, runpy, sys; runpy.run_path(sys.argv[1]); print(os.environ['MOEBALANCE_CACHE'])"
    env = {**os.environ, "MOEBALANCE_CACHE": str(users)}
    env.pop("MOEBALANCE_TEST_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests" / "conftest.py")], env=env, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).resolve() == (ROOT / ".cache" / "moebalance").resolve()
    env["MOEBALANCE_TEST_CACHE"] = str(tmp_path / "shared")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests" / "conftest.py")], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "shared")
