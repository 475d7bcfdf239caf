"""The VLM feature converter: a task's tokenised example -> model features
(docs/data.md, "The batch"): prefix ids then suffix ids, padded to P + S.

The prefix is cut to P ids and the suffix to S (a cut suffix loses its EOS,
as in T5X); config.data.truncation decides first whether such examples get
here at all (truncation.py). Prompt (evaluation) examples hold the prefix
only, padded to P, with mask_ar all 0: decoding appends the suffix.
"""
import tensorflow as tf


def _pad(ids: tf.Tensor, length: int) -> tf.Tensor:
  """Zero-pads a 1-D int32 tensor at the end to `length`; static shape."""
  padded = tf.pad(ids, [[0, length - tf.size(ids)]])
  return tf.ensure_shape(padded, [length])


def fit_image(example: dict, size: int) -> dict:
  """The example with its image ([-1, 1]) resized to [size, size] (left
  untouched when already that size) as transformers' SigLIP image processor
  does (docs/data.md): bicubic, antialiased, clipped to the value range.
  """
  if example["image"].shape[:2].as_list() == [size, size]:
    return example
  resized = tf.image.resize(example["image"], [size, size], method="bicubic",
                            antialias=True)
  return {**example, "image": tf.clip_by_value(resized, -1.0, 1.0)}


def train_features(example: dict, task_id: int, *, prefix_length: int,
                   suffix_length: int) -> dict:
  """Model features of a training example, tagged with its task id."""
  prefix = tf.cast(example["prefix"][:prefix_length], tf.int32)
  suffix = tf.cast(example["suffix"][:suffix_length], tf.int32)
  length = prefix_length + suffix_length
  in_suffix = tf.concat([tf.zeros_like(prefix), tf.ones_like(suffix)], 0)
  return {
      "image": example["image"],
      "text": _pad(tf.concat([prefix, suffix], 0), length),
      # The loss and causal masks coincide here: every suffix token (and only
      # those) is predicted, and predicted tokens must not see later ones.
      "mask_ar": _pad(in_suffix, length),
      "mask_loss": _pad(in_suffix, length),
      "mask_input": _pad(tf.ones_like(in_suffix), length),
      "task_id": tf.constant(task_id, tf.int32),
  }


def prompt_features(example: dict, task_id: int, *,
                    prefix_length: int) -> dict:
  """Model features of an evaluation prompt, plus its references."""
  prefix = tf.cast(example["prefix"][:prefix_length], tf.int32)
  return {
      "image": example["image"],
      "text": _pad(prefix, prefix_length),
      "mask_ar": tf.zeros([prefix_length], tf.int32),
      "mask_input": _pad(tf.ones_like(prefix), prefix_length),
      "task_id": tf.constant(task_id, tf.int32),
      "references": example["references"],
  }
