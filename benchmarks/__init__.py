"""Benchmarks of Nest against its baselines on FOLDOC (not tests: numbers, not assertions).

Run ``python -m benchmarks.run [--quick]``; see ``benchmarks/README.md``.
"""
