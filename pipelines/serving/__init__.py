"""sqlops serving stages and helpers."""
