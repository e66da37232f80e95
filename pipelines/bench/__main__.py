"""`python -m pipelines.bench [train|generation|serving]`: see pipelines/bench/compare.py."""

from pipelines.bench.compare import main

main()
