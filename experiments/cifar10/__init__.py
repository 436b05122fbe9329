"""CIFAR-10 experiments (``python -m experiments.cifar10.cifar10mlp``)."""
