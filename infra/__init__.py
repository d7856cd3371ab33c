"""Nexus infrastructure: GPU work-pool workers, provider clients, CoreWeave template, images, costs."""
