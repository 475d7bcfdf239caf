"""Packing: several train examples in one row, each with its own image.

A packed row (row_layout.py; its keys and shapes are in docs/data.md) holds
up to M examples: images [M, ...] by slot, the examples' real text tokens
one after another then padding [T], segment_ids (m + 1 on example m's
tokens, 0 on padding), and task_id and over_length per slot [M].

Rows are filled first fit, in stream order, over windows of consecutive
examples: each example goes to the first row of its window that has a free
slot and room for its text. Everything is a function of the stream, so
packing stays deterministic and resumable.
"""
import tensorflow as tf

_TEXT_KEYS = ("text", "mask_ar", "mask_loss", "mask_input")


def first_fit(lengths: tf.Tensor, *, max_examples: int,
              text_length: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(row, slot, offset), int32 [K] each, of examples of text `lengths`
  (int32 [K], each <= text_length): the example's row (numbered in order of
  opening), its slot in the row and where its text starts."""
  count = tf.shape(lengths)[0]
  used = tf.zeros([count], tf.int32)     # Text tokens of each row so far.
  filled = tf.zeros([count], tf.int32)   # Examples of each row so far.
  rows, slots, offsets = (tf.TensorArray(tf.int32, size=count)
                          for _ in range(3))

  def place(k, used, filled, rows, slots, offsets):
    fits = (used + lengths[k] <= text_length) & (filled < max_examples)
    # The first row that fits; an unopened row always does.
    row = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    at = tf.one_hot(row, count, dtype=tf.int32)
    return (k + 1, used + at * lengths[k], filled + at,
            rows.write(k, row), slots.write(k, filled[row]),
            offsets.write(k, used[row]))

  _, _, _, rows, slots, offsets = tf.while_loop(
      lambda k, *_: k < count, place,
      (tf.constant(0), used, filled, rows, slots, offsets))
  return rows.stack(), slots.stack(), offsets.stack()


def pack_window(examples: dict, *, max_examples: int,
                text_length: int) -> dict:
  """A window of K train examples (converter.train_features, batched, with
  `over_length`) -> R packed rows, R <= K (see the module docstring)."""
  lengths = tf.reduce_sum(examples["mask_input"], axis=1)
  tf.debugging.assert_less_equal(
      lengths, text_length,
      "An example's text is longer than a packed row: "
      "config.data.packing.text_length must be >= prefix + suffix.")
  row, slot, offset = first_fit(lengths, max_examples=max_examples,
                                text_length=text_length)
  num_rows = tf.reduce_max(row) + 1
  # Example k's real tokens (a prefix of its text) go to its row at offset.
  example, position = tf.unstack(
      tf.cast(tf.where(examples["mask_input"] > 0), tf.int32), axis=1)
  token_at = tf.stack([tf.gather(row, example),
                       tf.gather(offset, example) + position], 1)
  text_shape = tf.stack([num_rows, text_length])
  take = lambda values: tf.gather_nd(values, tf.stack([example, position], 1))
  packed = {key: tf.scatter_nd(token_at, take(examples[key]), text_shape)
            for key in _TEXT_KEYS}
  packed["segment_ids"] = tf.scatter_nd(
      token_at, tf.gather(slot, example) + 1, text_shape)
  slot_at = tf.stack([row, slot], 1)
  per_slot = lambda values: tf.scatter_nd(
      slot_at, values, tf.concat([[num_rows, max_examples],
                                  tf.shape(values)[1:]], 0))
  for key in ("image", "task_id", "over_length"):
    packed[key] = per_slot(examples[key])
  return packed


def pack(ds: tf.data.Dataset, *, max_examples: int, text_length: int,
         window: int) -> tf.data.Dataset:
  """An (infinite) stream of train examples -> a stream of packed rows."""
  return ds.batch(window, drop_remainder=True).flat_map(
      lambda examples: tf.data.Dataset.from_tensor_slices(pack_window(
          examples, max_examples=max_examples, text_length=text_length)))
