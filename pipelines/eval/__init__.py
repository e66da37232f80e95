"""sqlops eval stages and helpers."""
