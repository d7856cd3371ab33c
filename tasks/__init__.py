"""Thin Prefect task wrappers, one file per step. Sets Nexus's environment before Prefect imports."""

from nexus_core.settings import configure_environment

configure_environment()
