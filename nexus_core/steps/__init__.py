"""One module per lifecycle step: ``<Step>Config``, ``<Step>Result``, ``run_<step>(cfg, *, inputs, out_uri)``.

Steps never import each other; they exchange ArtifactRefs.
"""
