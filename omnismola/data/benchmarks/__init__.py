"""The real benchmarks: TFDS builders from official files, and their tasks.

  images.py    decoding and sizing of every stored image
  manual.py    the shared builder base, schema and manual_dir checks
  builders.py  one builder per dataset, readers shared by format
  prompts.py   PaliGemma-style prompts -> the raw example format
  suite.py     the SeqIO tasks (registered on import, reading nothing)
"""
