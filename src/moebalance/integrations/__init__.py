"""Adapters that bring moebalance's balancing to other training stacks.

Each submodule imports its third-party library itself, on use: importing this package needs
nothing beyond moebalance's own dependencies. ``moebalance.integrations.transformers`` needs
Hugging Face ``transformers`` (the ``dev`` extra).
"""
