"""What the train stream does with examples longer than the feature lengths:
config.data.truncation, "truncate" (the converter cuts them), "drop" or
"error" (docs/data.md).

Every example leaving `apply` carries `over_length` (int32): how many
over-length examples of its task's stream it accounts for, i.e. 1 if it was
itself truncated, or the number dropped just before it. The iterator sums
these per task, so the counts are exact, deterministic and restored with
the input state.
"""
import tensorflow as tf

# The per-task count (metric `data/<task>/<name>`) each policy reports;
# "error" stops at the first over-length example, so there is none to count.
COUNTER_NAMES = {"truncate": "truncated", "drop": "dropped", "error": None}
# Under "drop", this many over-length examples in a row means the task (as
# good as) never fits: fail rather than let the stream search forever.
MAX_DROPPED_IN_A_ROW = 1000


def apply(ds: tf.data.Dataset, policy: str, *, task: str, prefix_length: int,
          suffix_length: int) -> tf.data.Dataset:
  """A task's tokenised train stream under `policy`, with `over_length`."""
  over = lambda x: ((tf.size(x["prefix"]) > prefix_length) |
                    (tf.size(x["suffix"]) > suffix_length))
  if policy == "truncate":
    return ds.map(lambda x: {**x, "over_length": tf.cast(over(x), tf.int32)})
  if policy == "error":
    return ds.map(lambda x: _fail_if_over_length(
        x, over(x), task, prefix_length, suffix_length))

  def count_drops(dropped_before, x):
    """Carries the number of consecutive drops to the next kept example."""
    is_over = over(x)
    check = tf.debugging.Assert(
        dropped_before < MAX_DROPPED_IN_A_ROW,
        [f"Task {task}: {MAX_DROPPED_IN_A_ROW} examples in a row are longer "
         f"than config.data.feature_lengths (prefix={prefix_length}, "
         f"suffix={suffix_length}) and config.data.truncation='drop' skips "
         "them all: raise the lengths or use 'truncate'."])
    with tf.control_dependencies([check]):
      after = tf.where(is_over, dropped_before + 1, 0)
    return after, {**x, "over_length": dropped_before, "keep": ~is_over}

  ds = ds.scan(tf.constant(0, tf.int32), count_drops)
  return ds.filter(lambda x: x["keep"]).map(
      lambda x: {k: v for k, v in x.items() if k != "keep"})


def _fail_if_over_length(x: dict, is_over: tf.Tensor, task: str,
                         prefix_length: int, suffix_length: int) -> dict:
  check = tf.debugging.Assert(
      ~is_over,
      [f"Task {task}: an example is longer than config.data.feature_lengths "
       f"(prefix={prefix_length}, suffix={suffix_length}) and "
       "config.data.truncation='error'. Its prefix and suffix lengths "
       "(ids, suffix with EOS) and prompt:", tf.size(x["prefix"]),
       tf.size(x["suffix"]), x["prefix_pretokenized"]])
  with tf.control_dependencies([check]):
    return {**x, "over_length": tf.identity(tf.zeros([], tf.int32))}
