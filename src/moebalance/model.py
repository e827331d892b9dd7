"""Deprecated alias of :mod:`moebalance.train.model` (removed in moebalance 0.2)."""

from moebalance._moved import alias

alias(__name__, "moebalance.train.model")
