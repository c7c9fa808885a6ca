"""Sparse-training engine: every pruning method of the lottery-ticket literature, one loop."""

__version__ = "0.1.0"
