"""Command-line experiments for pinet.

- ``python -m experiments.train``: the main job, a π-MLP on scikit-learn's digits.
- ``python -m experiments.cifar10.cifar10mlp``: the reference library's CIFAR-10 command.
- ``python -m experiments.compare``: the paper's Table 1 (NNGP, NTK, finite π-nets, MLP, π-limit)
  on digits.

The data loading, training loop, logging, checkpointing and plotting they share live in
:mod:`experiments.common`.
"""
