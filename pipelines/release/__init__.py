"""sqlops release stages and helpers."""
