"""sqlops data stages and helpers."""
