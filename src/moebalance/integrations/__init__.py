"""Adapters that bring moebalance's balancing to other training stacks.

Each submodule imports its third-party library itself, on use: importing this package needs
nothing beyond moebalance's own dependencies. ``moebalance.integrations.transformers`` needs
Hugging Face ``transformers`` (the ``dev`` extra).

This floor may import the library and :mod:`moebalance.parallel`, never the trainer, the lab or
the CLI: a user's own training stack takes the trainer's place.
"""
