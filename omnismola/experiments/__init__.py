"""Small-scale reproductions of the papers' claims, one command each.

  python -m omnismola.experiments.smola --workdir=DIR   # Omni-SMoLA

study.py trains a study's arms and writes its tables and plots;
docs/results.md shows what they measured.
"""
