"""Meta-learning jobs: ``python -m experiments.meta.train`` (MAML with π-nets; docs/meta.md)."""
