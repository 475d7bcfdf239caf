"""Chance levels of the synthetic tasks: what a model scores without the image.

The blind predictor answers every validation question with the most frequent
training target among training examples with the same prompt (the overall
most frequent target for an unseen prompt), and is scored with the task's
real metric. A model has learned to look at the image only where it clearly
beats this level.

  python -m omnismola.data.synthetic.baselines --data_dir=DIR
"""
import collections
import functools
from typing import Sequence

import tensorflow_datasets as tfds
from absl import app
from absl import logging
from absl import flags

from omnismola import storage
from omnismola.data.synthetic import builder
from omnismola.data.synthetic import scenes
from omnismola.eval import metrics


def _split(task: str, split: str, data_dir: str):
  """A built split's text features; images are left undecoded."""
  return tfds.builder(builder.tfds_name(task), data_dir=data_dir).as_dataset(
      split=split, decoders={"image": tfds.decode.SkipDecoding()})


def _train_pairs(task: str, data_dir: str):
  """(prefix, suffix) of every training example."""
  ds = _split(task, "train", data_dir).map(lambda x: (x["prefix"],
                                                      x["suffix"]))
  # Batched: reading 20k examples one by one costs seconds in Python.
  for prefixes, suffixes in ds.batch(4096).as_numpy_iterator():
    yield from zip((p.decode() for p in prefixes),
                   (s.decode() for s in suffixes))


def _validation(task: str, data_dir: str):
  """(prefix, references) of every validation example."""
  for x in _split(task, "validation", data_dir).as_numpy_iterator():
    yield x["prefix"].decode(), [r.decode() for r in x["references"]]


def blind_predictions(train_pairs, validation_prefixes) -> list[str]:
  """For each prefix, the commonest training suffix of that prefix (ties go
  to the suffix seen first, so the result is deterministic)."""
  by_prefix = collections.defaultdict(collections.Counter)
  overall = collections.Counter()
  for prefix, suffix in train_pairs:
    by_prefix[prefix][suffix] += 1
    overall[suffix] += 1
  return [(by_prefix.get(prefix) or overall).most_common(1)[0][0]
          for prefix in validation_prefixes]


@functools.lru_cache(maxsize=None)
def chance_level(task: str, data_dir: str) -> float:
  """The blind predictor's score on one task's validation split."""
  validation = list(_validation(task, data_dir))
  predictions = blind_predictions(_train_pairs(task, data_dir),
                                  [prefix for prefix, _ in validation])
  return metrics.compute(scenes.METRICS[task], predictions,
                         [refs for _, refs in validation])


def chance_levels(data_dir: str,
                  tasks: Sequence[str] = scenes.TASKS) -> dict[str, float]:
  """{"synthetic_<task>": chance level} of `tasks`, built in `data_dir`."""
  data_dir = storage.tensorflow_location(data_dir)
  return {f"synthetic_{task}": chance_level(task, data_dir) for task in tasks}


def format_table(levels: dict[str, float]) -> str:
  lines = [f"{'task':22s} {'metric':18s} chance", "-" * 48]
  for name, level in levels.items():
    metric = scenes.METRICS[name.removeprefix("synthetic_")]
    lines.append(f"{name:22s} {metric:18s} {level:6.2f}")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS logs every file it opens.
  print(format_table(chance_levels(flags.FLAGS.data_dir)))


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets",
                      "TFDS data dir holding the built omnismola_synthetic.")
  app.run(main)
