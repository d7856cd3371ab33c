"""Thin Prefect task wrappers, one file per step.

Importing this package changes nothing; the environment is set by the entry point that runs the flow.
"""
