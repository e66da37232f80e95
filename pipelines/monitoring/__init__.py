"""sqlops monitoring stages and helpers."""
