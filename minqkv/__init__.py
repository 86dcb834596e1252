"""minqkv: does a Transformer need three projections? A from-scratch answer on a CPU."""

__version__ = "0.1.0"
