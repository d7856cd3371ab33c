"""Prefect flows: composition only. Sets Nexus's environment before Prefect imports."""

from nexus_core.settings import configure_environment

configure_environment()
