"""Benchmarks: each prints its figures and ratios against a baseline run side by side."""
