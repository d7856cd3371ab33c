"""REST clients for the GPU clouds Nexus launches workers' machines on (Lambda Cloud, RunPod)."""
