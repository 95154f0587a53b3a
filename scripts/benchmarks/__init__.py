"""The benchmarks behind ``scripts/bench.py``: one module per subcommand, shared plumbing in ``common``."""
