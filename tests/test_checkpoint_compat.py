"""Checkpoints written before a refactor load after it, to the same outputs.

tests/data/checkpoint_2026_12_04 is a workdir's checkpoint saved by the
trainer at commit 05c0b09 (the tiny model, two layers per tower, one
training step, with experts of every kind: SMoLA pools on the decoder's
attention, a sparse MoE on ViT layer 0's MLP (so the ViT tower is split
into segments), sparse LoRA sharing a gate in decoder layer 1's MLP, DoRA
on the connector, LoRA on the patch embedding). `expected_logits.npy` are
that model's logits on `_inputs()`, computed by the code of that commit.
"""
import os

import numpy as np
from flax import nnx

from omnismola import pretrained
from omnismola.train import init as init_lib

CHECKPOINT = os.path.join(os.path.dirname(__file__), "data",
                          "checkpoint_2026_12_04")


def _inputs():
  """A fixed batch of two rows: image, prompt, suffix."""
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  text = rng.integers(3, 259, (2, 8)).astype(np.int32)
  mask_ar = np.array([[0, 0, 0, 1, 1, 1, 1, 0]] * 2, np.int32)
  mask_input = np.array([[1] * 7 + [0], [1] * 8], np.int32)
  return image, text, mask_ar, mask_input


def test_a_checkpoint_saved_before_loads_every_parameter_and_gives_its_logits():
  model = pretrained.from_pretrained(CHECKPOINT)
  saved = init_lib.read_parameters(init_lib.resolve_step_dir(CHECKPOINT))
  built = init_lib.flatten_by_path(nnx.to_pure_dict(nnx.state(model)))
  # The same parameters at the same paths: none fresh, none left over.
  assert sorted(built) == sorted(saved)
  logits = np.asarray(model(*_inputs()))
  expected = np.load(os.path.join(CHECKPOINT, "expected_logits.npy"))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
