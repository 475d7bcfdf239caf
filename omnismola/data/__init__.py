"""The data layer: SeqIO tasks, mixtures and the input pipeline.

This is the only omnismola package that imports TensorFlow. TensorFlow would
otherwise reserve every GPU's memory as soon as it initialises, starving JAX,
so GPUs are hidden from it here, before any other data module runs.
"""
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  # Raised when TensorFlow already initialised its devices (someone used it
  # before importing us); the visible devices can then no longer change.
  pass
