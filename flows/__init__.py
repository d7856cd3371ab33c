"""Prefect flows: composition only.

Importing this package changes nothing (no environment variables, no directories): entry points set
Nexus's environment, see ``flows.common.prepare_process`` and ``flows.common.flow_lineage``.
"""
