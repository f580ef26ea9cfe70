"""Modules of bench/overhead.py: harness, sections, stats (statistics), report."""
