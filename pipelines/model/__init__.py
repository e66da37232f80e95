"""sqlops model stages and helpers."""
