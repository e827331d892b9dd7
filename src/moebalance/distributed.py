"""Deprecated alias of :mod:`moebalance.parallel` (removed in moebalance 0.2)."""

from moebalance._moved import alias

alias(__name__, "moebalance.parallel")
