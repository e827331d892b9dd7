"""The lab: experiments built on the trainer, and the reports and plots they write.

Modules:

* :mod:`~moebalance.lab.compare`: ``moebalance compare`` (Loss-Free against the auxiliary loss);
* :mod:`~moebalance.lab.sweeps`: ``moebalance sweep`` (the paper's Figure 2 and ablations);
* :mod:`~moebalance.lab.leakage`: ``moebalance leakage`` (future-token leakage, paper §5);
* :mod:`~moebalance.lab.replay`: ``moebalance replay`` (measured loads on expert-parallel ranks);
* :mod:`~moebalance.lab.reporting`: ``report.md``, JSON reports and PNG figures of finished runs.

This floor may import the library, :mod:`moebalance.parallel` and :mod:`moebalance.train`; nothing
below it imports the lab, and nothing imports the CLI.
"""
