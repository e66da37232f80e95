"""Benchmark and experiment drivers: they train, evaluate and serve through the layers below
(model, eval, release, serving) and compare the results, so they sit above all of them.

- `compare`: `make bench` (`python -m pipelines.bench [train|generation|serving]`);
- `experiment`: `sqlops experiment lora-rank|precision`;
- `loadtest`: the gateway under load and hot swaps (the serving part of `make bench`).
"""
