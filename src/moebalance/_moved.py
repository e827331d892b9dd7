"""Old import paths of modules that moved into subpackages (kept for one release, moebalance 0.1.x)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make ``import old`` give module ``new``, with a ``DeprecationWarning`` naming the new path."""
    warnings.warn(f"{old} moved to {new}; the old path goes away in moebalance 0.2", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
