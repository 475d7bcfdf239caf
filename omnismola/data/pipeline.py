"""The input pipeline: the only data API the trainer uses.

  prepare(config.data)                       build missing TFDS data
  make_train_iterator(config.data, ...)      per-host numpy train batches
  make_eval_sets(config.data, ...)           per-task fixed-shape eval batches

The `config.data` fields are in docs/configuration.md, the batches in
docs/data.md. Training reads one shard of every task (hosts holding the same
batch rows read the same shard, train/host_shards.py), applies the
truncation policy, converts examples to model features tagged with the
task's index in the mixture, samples tasks by the mixture rates, packs them
if asked, batches and repeats forever. Everything is seeded, so an
iterator's state is the number of batches it handed out (plus its shard and
per-task over-length counts), and a resumed iterator skips exactly those.
"""
import contextlib
import dataclasses
import functools
import importlib
import math
import os
import re
from typing import Callable, Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from omnismola import errors
from omnismola import row_layout
from omnismola import storage
from omnismola.data import converter
from omnismola.data import jsonl
from omnismola.data import mixtures
from omnismola.data import packing
from omnismola.data import tasks as tasks_lib
from omnismola.data import truncation
from omnismola.data.synthetic import baselines
from omnismola.data.synthetic import scenes


def get_vocabulary(data_config) -> seqio.Vocabulary:
  """The vocabulary of config.data.vocabulary."""
  return tasks_lib.get_vocabulary(data_config.vocabulary)


def detokenize(ids: Sequence[int],
               vocabulary: seqio.Vocabulary = tasks_lib.VOCAB) -> str:
  """Token ids -> text, up to the first EOS, padding and special ids dropped.
  """
  return vocabulary.decode([int(i) for i in ids])


def mixture_task_names(data_config) -> list[str]:
  """The tasks of config.data.mixture (a task's index is its task_id), once
  config.data.task_modules and config.data.jsonl registered theirs."""
  for module in data_config.task_modules:
    importlib.import_module(module)
  jsonl.register_from_config(data_config)
  return mixtures.task_names(data_config.mixture)


@contextlib.contextmanager
def input_errors():
  """Re-raises an InputError raised inside tf.data (which wraps it in an
  OpError with its traceback) as itself: the user needs the message only."""
  try:
    yield
  except tf.errors.OpError as e:
    found = re.search(r"InputError: ([^\n]*)", e.message)
    if not found:
      raise
    raise errors.InputError(found.group(1)) from None


def _use_data_dir(data_config, names: Sequence[str]) -> str:
  """Points the TFDS sources of `names` at config.data.tfds_data_dir.

  The global override covers sources that have not resolved their directory
  yet; sources that already did (in tests, notebooks) are re-pointed one by
  one. TensorFlow reads it (storage.tensorflow_location).
  """
  data_dir = storage.tensorflow_location(data_config.tfds_data_dir)
  seqio.set_tfds_data_dir_override(data_dir)
  for name in names:
    source = seqio.get_mixture_or_task(name).source
    if isinstance(source, seqio.TfdsDataSource):
      source.tfds_dataset.override_data_dir(data_dir)
  return data_dir


def prepare(data_config) -> None:
  """Builds the missing TFDS data of the mixture's tasks, downloading
  nothing: the synthetic suite is rendered, real datasets are read from
  `<manual_dir>/<builder name>`. Cheap when everything is there."""
  names = mixture_task_names(data_config)
  data_dir = _use_data_dir(data_config, names)
  manual_dir = storage.path(data_config.manual_dir or
                            os.path.join(data_dir, "downloads/manual"))
  for name in names:
    source = seqio.get_mixture_or_task(name).source
    if not isinstance(source, seqio.TfdsDataSource):
      continue
    builder = source.tfds_dataset.builder
    if not builder.is_prepared():
      logging.info("Building %s into %s (once; later runs reuse it).",
                   source.tfds_dataset.name, data_dir)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(manual_dir / builder.name)))


def _seed(*parts: int) -> int:
  """A 32-bit seed derived from several integers, for tf.data."""
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _train_dataset(data_config, *, global_batch_size: int, seed: int,
                   shard_index: int, shard_count: int,
                   threads: int | None) -> tf.data.Dataset:
  """One shard's infinite stream of train batches, before any skipping,
  each example with its `over_length` count (truncation.py)."""
  if global_batch_size % shard_count:
    raise ValueError(f"The global batch size {global_batch_size} is not "
                     f"divisible by the {shard_count} host shards.")
  policy = data_config.truncation
  layout = row_layout.row_layout(data_config)
  # Rates from example counts read the data: point the sources at it first.
  _use_data_dir(data_config, mixtures.task_names(data_config.mixture))
  mixture = mixtures.mixture_tasks(data_config.mixture)
  lengths = dict(prefix_length=data_config.feature_lengths["prefix"],
                 suffix_length=data_config.feature_lengths["suffix"])
  shard = seqio.ShardInfo(index=shard_index, num_shards=shard_count)
  buffer = max(1, data_config.shuffle_buffer // len(mixture))
  vocabulary = get_vocabulary(data_config)
  datasets = []
  for task_id, (name, _) in enumerate(mixture):
    ds = tasks_lib.get_task(name, vocabulary).get_dataset(
        sequence_length=None, split="train", shuffle=True,
        shuffle_buffer_size=buffer, seed=_seed(seed, task_id),
        shard_info=shard, num_epochs=None, use_cached=False,
        try_in_mem_cache=False)
    # Before the image work, so dropped examples cost no resizing.
    ds = truncation.apply(ds, policy, task=name, **lengths)
    ds = ds.map(functools.partial(converter.fit_image,
                                  size=data_config.image_size),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, task_id=task_id: {
        **converter.train_features(x, task_id, **lengths),
        "over_length": x["over_length"]}, num_parallel_calls=tf.data.AUTOTUNE)
    datasets.append(ds)
  rates = np.array([rate for _, rate in mixture], np.float64)
  ds = tf.data.Dataset.sample_from_datasets(
      datasets, weights=(rates / rates.sum()).tolist(),
      # Shards draw different task sequences, so a global batch mixes
      # better; hosts reading one shard must draw the same one.
      seed=_seed(seed, shard_index, len(mixture)))
  if layout.packed:
    ds = packing.pack(ds, max_examples=layout.images,
                      text_length=layout.text_length, window=layout.window)
  ds = ds.batch(global_batch_size // shard_count, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True  # Resume replays the exact same batches.
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


class TrainIterator:
  """Per-host numpy train batches that know how many they handed out, and
  how many over-length examples of each task those batches account for
  (each example's `over_length` is added up here and leaves the batch)."""

  def __init__(self, dataset: tf.data.Dataset, *, shard: tuple[int, int],
               batches_consumed: int, over_length: Sequence[int]):
    self._shard = list(shard)
    self._batches_consumed = batches_consumed
    self._over_length = np.array(over_length, np.int64)
    self._iterator = dataset.skip(batches_consumed).prefetch(
        tf.data.AUTOTUNE).as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    with input_errors():
      batch = next(self._iterator)
    np.add.at(self._over_length, batch["task_id"], batch.pop("over_length"))
    self._batches_consumed += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable; pass to make_train_iterator(state=...) to resume."""
    return {"batches_consumed": self._batches_consumed, "shard": self._shard,
            "over_length": self._over_length.tolist()}


def make_train_iterator(data_config, *, global_batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1,
                        state: dict | None = None,
                        threads: int | None = None) -> TrainIterator:
  """The train batches of shard `shard_index` of `shard_count`, resumed
  after `state` if given; they depend only on the data, the config, `seed`
  and the shard. `threads` caps tf.data's threads (default: every core)."""
  num_tasks = len(mixture_task_names(data_config))  # Registers user tasks.
  dataset = _train_dataset(
      data_config, global_batch_size=global_batch_size, seed=seed,
      shard_index=shard_index, shard_count=shard_count, threads=threads)
  shard = (shard_index, shard_count)
  if not state:
    state = dict(batches_consumed=0, over_length=[0] * num_tasks)
  else:
    if tuple(state["shard"]) != shard:
      logging.warning(
          "The checkpoint's input position is from shard %s (index, count); "
          "this run reads shard %s, so it sees other examples than the "
          "interrupted run would have (the mesh or process count changed).",
          tuple(state["shard"]), shard)
    # Replaying is exact and costs one pass over the skipped examples.
    logging.info("Resuming the input pipeline after %d batches.",
                 state["batches_consumed"])
  return TrainIterator(dataset, shard=shard,
                       batches_consumed=int(state["batches_consumed"]),
                       over_length=state["over_length"])


def over_length_metrics(data_config, process_states: Sequence[dict]
                        ) -> dict[str, float]:
  """Over-length examples per task so far, over the whole global batch.

  `process_states` are every process's `TrainIterator.get_state()`; each
  shard counts once. Keys are `data/<task>/truncated` or `.../dropped` (by
  config.data.truncation); none under "error".
  """
  counter = truncation.COUNTER_NAMES[data_config.truncation]
  if counter is None:
    return {}
  per_shard = {tuple(s["shard"]): s["over_length"] for s in process_states}
  totals = np.sum(list(per_shard.values()), axis=0)
  return {f"data/{name}/{counter}": float(count) for name, count in
          zip(mixture_task_names(data_config), totals)}


@dataclasses.dataclass
class EvalSet:
  """One task's evaluation data; `batches()` iterates it from the start.

  Batches have a fixed shape: numpy image, text (the prompt, P ids), mask_ar
  (0), mask_input, task_id, example_mask (1 real, 0 padding), example_index
  (the row's position in the split); references (per row, a list of
  strings) and, for tasks whose examples have one, ids ("" on padding).
  """
  name: str
  task_id: int
  metric: str
  batches: Callable[[], Iterator[dict]]


def _eval_examples(name: str, data_config, split: str,
                   max_examples: int | None) -> tf.data.Dataset:
  """One task's examples of `split`, in order, images resized."""
  _use_data_dir(data_config, [name])
  ds = tasks_lib.get_task(name, get_vocabulary(data_config)).get_dataset(
      sequence_length=None, split=split, shuffle=False, num_epochs=1,
      use_cached=False, try_in_mem_cache=False)
  ds = ds.take(max_examples) if max_examples else ds
  return ds.map(functools.partial(converter.fit_image,
                                  size=data_config.image_size))


def _stack(rows: list[dict], batch_size: int, pad_row: dict) -> dict:
  """Stacks `rows` into a batch of `batch_size`, references and ids (if any)
  as lists. Padding repeats `pad_row`, a real example, so the model sees
  ordinary inputs; `example_mask` = 0, empty references and ids mark it."""
  real = len(rows)
  rows = rows + [pad_row] * (batch_size - real)
  batch = {k: np.stack([row[k] for row in rows]) for k in pad_row
           if k not in ("references", "id")}
  batch["example_mask"] = (np.arange(batch_size) < real).astype(np.int32)
  if "references" in pad_row:
    batch["references"] = [
        [r.decode("utf-8") for r in row["references"]] if i < real else []
        for i, row in enumerate(rows)]
  if "id" in pad_row:
    batch["ids"] = [row["id"].decode("utf-8") if i < real else ""
                    for i, row in enumerate(rows)]
  return batch


def _eval_batches(name: str, task_id: int, data_config, *, batch_size: int,
                  split: str, max_examples: int | None, process_index: int,
                  process_count: int) -> Iterator[dict]:
  """This host's batches of one task, a whole split in order; every host
  yields the same number."""
  prompt = functools.partial(
      converter.prompt_features, task_id=task_id,
      prefix_length=data_config.feature_lengths["prefix"])
  # One pass over the split: every host needs the total count anyway.
  examples = _eval_examples(name, data_config, split, max_examples).map(
      lambda x: {**prompt(x), **({"id": x["id"]} if "id" in x else {})})
  with input_errors():
    rows = list(examples.as_numpy_iterator())
  # Hosts run each decode step together, so every host yields as many
  # batches as the host with the most examples needs.
  num_batches = math.ceil(math.ceil(len(rows) / process_count) / batch_size)
  mine = rows[process_index::process_count]  # tf.data's shard order.
  if not mine:
    raise ValueError(f"{name} ({split}): no examples for process "
                     f"{process_index} of {process_count}.")
  for start in range(0, num_batches * batch_size, batch_size):
    batch = _stack(mine[start:start + batch_size], batch_size, mine[-1])
    # Each row's position in the split, so that the evaluator can put the
    # hosts' predictions back in order.
    batch["example_index"] = np.arange(
        start, start + batch_size, dtype=np.int32) * process_count + (
            process_index)
    yield batch


def make_eval_sets(data_config, *, batch_size: int, split: str = "validation",
                   tasks: Sequence[str] | None = None,
                   max_examples: int | None = None, process_index: int = 0,
                   process_count: int = 1) -> list[EvalSet]:
  """Eval sets of `tasks` (default: every task of the mixture), in order;
  `max_examples` caps each task (over all hosts), each host evaluates its
  shard. A task without `split` fails here, before any reading."""
  names = mixture_task_names(data_config)
  wanted = list(tasks) if tasks else names
  unknown = [name for name in wanted if name not in names]
  if unknown:
    raise errors.InputError(f"Eval tasks {unknown} are not in the mixture "
                            f"{data_config.mixture!r}, whose tasks are "
                            f"{names}.")
  _use_data_dir(data_config, wanted)
  for name in wanted:
    splits = list(seqio.get_mixture_or_task(name).source.splits)
    if split not in splits:
      raise errors.InputError(f"Task {name!r} has no {split!r} split "
                              f"(config.eval.split); its splits: {splits}.")
  return [
      EvalSet(name=name, task_id=names.index(name),
              metric=tasks_lib.metric_of(name),
              batches=functools.partial(
                  _eval_batches, name, names.index(name), data_config,
                  batch_size=batch_size, split=split,
                  max_examples=max_examples, process_index=process_index,
                  process_count=process_count))
      for name in wanted
  ]


def make_labelled_batches(data_config, name: str, *, batch_size: int,
                          split: str = "validation",
                          max_examples: int | None = None) -> Iterator[dict]:
  """One task's examples of `split` in training format, in order (one host),
  for teacher-forced passes such as `omnismola.analyze`.

  Batches hold the train keys and `example_mask`; the last is padded (see
  `_stack`). `max_examples` caps the examples read.
  """
  names = mixture_task_names(data_config)
  if name not in names:
    raise errors.InputError(f"Task {name!r} is not in the mixture "
                     f"{data_config.mixture!r}, whose tasks are {names}.")
  lengths = data_config.feature_lengths
  rows = list(_eval_examples(name, data_config, split, max_examples).map(
      functools.partial(converter.train_features, task_id=names.index(name),
                        prefix_length=lengths["prefix"],
                        suffix_length=lengths["suffix"])).as_numpy_iterator())
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    yield _stack(chunk, batch_size, chunk[-1])


def _prompt_row(data_config, image_path: str, prompt: str, *,
                example: str) -> dict:
  """One prompt on one image file as an eval row (empty references), made
  as a task's are. A prompt over feature_lengths.prefix is cut under
  truncation="truncate" and refused otherwise (there is no other example to
  go on to). `example` names the prompt in errors.
  """
  image = tasks_lib.image_in_model_range(jsonl.load_image(image_path, example))
  ids = tasks_lib.prompt_ids(get_vocabulary(data_config), tf.constant(prompt))
  length = data_config.feature_lengths["prefix"]
  if len(ids) > length and data_config.truncation != "truncate":
    raise errors.InputError(
        f"{example}: the prompt is {len(ids)} tokens long (BOS and separator "
        f"included), more than config.data.feature_lengths.prefix={length}, "
        f"and config.data.truncation={data_config.truncation!r}: shorten "
        "it, raise the length or use 'truncate'.")
  resized = converter.fit_image(
      dict(image=image, prefix=ids, references=tf.constant([], tf.string)),
      data_config.image_size)
  features = converter.prompt_features(resized, task_id=0,
                                       prefix_length=length)
  return {k: v.numpy() for k, v in features.items()}


def prompt_batch(data_config, image_path: str, prompt: str) -> dict:
  """A batch of one prompt on one image file, prepared as evaluation is
  (`_prompt_row`): image, text, mask_ar and mask_input."""
  row = _prompt_row(data_config, image_path, prompt, example=image_path)
  return {k: row[k][None] for k in ("image", "text", "mask_ar", "mask_input")}


def prompt_file_batches(data_config, prompts: jsonl.Prompts, *,
                        batch_size: int) -> Iterator[dict]:
  """Eval-shaped batches of a prompt file's lines (jsonl.read_prompts), in
  order, images read batch by batch; `ids` hold the lines' ids."""
  lines = list(zip(prompts.images, prompts.prompts, prompts.ids,
                   prompts.where))
  for start in range(0, len(lines), batch_size):
    rows = [{**_prompt_row(data_config, image, prompt, example=where),
             "id": line_id.encode("utf-8")}
            for image, prompt, line_id, where in
            lines[start:start + batch_size]]
    batch = _stack(rows, batch_size, rows[-1])
    batch["example_index"] = np.arange(start, start + batch_size,
                                       dtype=np.int32)
    yield batch


def chance_levels(data_config) -> dict[str, float]:
  """Blind-guess scores of the mixture's synthetic tasks (others omitted)."""
  names = mixture_task_names(data_config)
  data_dir = _use_data_dir(data_config, names)
  return baselines.chance_levels(data_dir, [
      task for task in scenes.TASKS if f"synthetic_{task}" in names])
