"""Benchmarks of nemotron_fast: pytest-benchmark suites of the hot ops (``pytest benchmarks/ --benchmark-only``)
and the end-to-end runner (``nemotron-fast bench`` / ``python -m benchmarks.run``). Not part of the test run:
``pytest`` alone collects only ``tests/``."""
