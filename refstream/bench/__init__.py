"""Benchmarks: scripts that print a table with hardware and versions (never timed unit tests)."""
