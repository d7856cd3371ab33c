"""CoreWeave: a Kubernetes work-pool base job template (GPU limits, GPU-class affinity, shared PVC)."""
