"""omnismola: mixtures of experts for vision-language models in JAX/Flax."""
