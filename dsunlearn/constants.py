"""Values that data loading, loss math and evaluation must agree on, below all of them."""

IGNORE_INDEX = -100
"""Label of a position that counts in no loss or metric (padding, special tokens a method leaves alone)."""
