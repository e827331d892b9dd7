"""Deprecated alias of :mod:`moebalance.train.config` (removed in moebalance 0.2)."""

from moebalance._moved import alias

alias(__name__, "moebalance.train.config")
