"""Helpers for multi-process tests: a launcher and the scripts it runs (one process per rank)."""
