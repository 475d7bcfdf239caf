"""Small-scale reproductions of the papers' claims, one command each
(`python -m omnismola.experiments.smola --workdir=DIR`); study.py is what
they share, docs/results.md what they measured."""
