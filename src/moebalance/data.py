"""Deprecated alias of :mod:`moebalance.train.data` (removed in moebalance 0.2)."""

from moebalance._moved import alias

alias(__name__, "moebalance.train.data")
