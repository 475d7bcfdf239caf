"""omnismola: mixtures of experts for vision-language models in JAX/Flax.

`omnismola.from_pretrained(DIR)` loads a model (see omnismola/pretrained.py);
it is imported on first use, so `import omnismola.data` stays light.
"""


def __getattr__(name):
  if name == "from_pretrained":
    from omnismola.pretrained import from_pretrained
    return from_pretrained
  raise AttributeError(f"module 'omnismola' has no attribute {name!r}")
