"""Your data without Python: a task over a folder of JSON-lines files.

One file per split, `<dir>/<split>.jsonl`, one example per line with
`image` (relative to the file's folder), `prefix` or `question` (prompted
as PaliGemma's VQA: "answer en {question}"), `answer` or `answers` and an
optional `id`; docs/data.md has examples.

Registered from `config.data.jsonl = dict(name=..., dir=..., metric=...)`
the first time the pipeline looks up the mixture's tasks
(`register_from_config`). Every split file is read and checked then, so a
malformed line, a missing field or image is an InputError naming the file
and line before anything starts; an image that does not decode is found
when it is read.
"""
import dataclasses
import functools
import json
import os
from typing import Iterator, Sequence

import seqio
import tensorflow as tf

from omnismola import errors
from omnismola import storage
from omnismola.data import tasks
from omnismola.data.benchmarks import images
from omnismola.data.benchmarks import prompts
from omnismola.eval import metrics

SUFFIX = ".jsonl"

# Task name -> (dir, metric) of the JSON-lines tasks registered so far:
# asking again for the same task reads nothing.
_REGISTERED: dict[str, tuple[str, str]] = {}


@dataclasses.dataclass(frozen=True)
class Split:
  """One split file's examples, as columns (a relative image already
  resolved against the file's folder)."""
  images: list[str]
  prompts: list[str]  # The line's prefix, or its question.
  has_prefix: list[bool]
  answers: list[list[str]]
  ids: list[str]
  where: list[str]  # "file:line" of each example, for error messages.


def text_field(record: dict, field: str, where: str) -> str:
  """record[field] as a string (numbers allowed); `where` names the line."""
  if field not in record:
    raise errors.InputError(f"{where}: missing field {field!r}.")
  value = record[field]
  if not isinstance(value, (str, int, float)) or isinstance(value, bool):
    raise errors.InputError(f"{where}: field {field!r} must be a string, "
                            f"not {json.dumps(value)}.")
  return str(value)


def _one_of(record: dict, fields: tuple[str, str], where: str) -> str:
  present = [f for f in fields if f in record]
  if len(present) != 1:
    raise errors.InputError(
        f"{where}: needs exactly one of the fields {fields[0]!r} or "
        f"{fields[1]!r}; the line has {sorted(record)}.")
  return present[0]


def image_path(folder, image: str) -> str:
  """`image` as written in a file of `folder`: relative to that folder."""
  if storage.is_url(image) or os.path.isabs(image):
    return os.fspath(storage.path(image))
  return os.fspath(folder / image)


def records(path) -> Iterator[tuple[str, int, dict]]:
  """("file:line", line number, object) of every non-blank line of `path`."""
  path = storage.path(path)
  if not path.is_file():
    raise errors.InputError(f"{path} does not exist.")
  with path.open() as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.InputError(f"{where}: not valid JSON ({e}).") from None
      if not isinstance(record, dict):
        raise errors.InputError(f"{where}: a line must be a JSON object, "
                                f"not {line.strip()[:80]}.")
      yield where, number, record


def read_split(path) -> Split:
  """The examples of one split file; an InputError names a bad line."""
  path = storage.path(path)
  split = Split([], [], [], [], [], [])
  for where, number, record in records(path):
    split.images.append(image_path(path.parent,
                                   text_field(record, "image", where)))
    field = _one_of(record, ("prefix", "question"), where)
    split.prompts.append(text_field(record, field, where))
    split.has_prefix.append(field == "prefix")
    target = _one_of(record, ("answer", "answers"), where)
    answers = record[target] if target == "answers" else [record[target]]
    if not isinstance(answers, list) or not answers:
      raise errors.InputError(f"{where}: field 'answers' must be a "
                              "non-empty list of strings.")
    split.answers.append([text_field({target: a}, target, where)
                          for a in answers])
    split.ids.append(str(record["id"]) if "id" in record else str(number))
    split.where.append(where)
  if not split.images:
    raise errors.InputError(f"{path}: no examples.")
  return split


@dataclasses.dataclass(frozen=True)
class Prompts:
  """The lines of a prompt file (`--mode=predict --predict_file`)."""
  images: list[str]
  prompts: list[str]
  ids: list[str]
  where: list[str]


def read_prompts(path) -> Prompts:
  """Lines {"image": ..., "prompt": ..., "id": optional (default: the line
  number)}, a relative image relative to the file's folder; every image is
  checked to exist."""
  path = storage.path(path)
  lines = Prompts([], [], [], [])
  for where, number, record in records(path):
    lines.images.append(image_path(path.parent,
                                   text_field(record, "image", where)))
    lines.prompts.append(text_field(record, "prompt", where))
    lines.ids.append(str(record["id"]) if "id" in record else str(number))
    lines.where.append(where)
  if not lines.images:
    raise errors.InputError(f"{path}: no prompts.")
  check_images_exist(lines.images, lines.where)
  return lines


def check_images_exist(paths: Sequence[str], where: Sequence[str]) -> None:
  """Every one of `paths` is a file (`where` names each in errors): one
  listing per folder, so that this stays cheap for many images and on
  remote storage."""
  listed = {}
  for image, line in zip(paths, where):
    folder, name = os.path.split(image)
    if folder not in listed:
      folder_path = storage.path(folder)
      listed[folder] = ({p.name for p in folder_path.iterdir()}
                        if folder_path.is_dir() else set())
    if name not in listed[folder]:
      raise errors.InputError(f"{line}: image {image} does not exist.")


def load_image(path: str, where: str):
  """images.load_image, raising InputErrors (which name `where`)."""
  try:
    return images.load_image(path, example=where)
  except (FileNotFoundError, ValueError) as e:
    raise errors.InputError(str(e)) from None


class _Source(seqio.FunctionDataSource):
  """seqio's FunctionDataSource without its warning about shuffling uncached
  data on restarts: the task's seeded shuffle buffer shuffles, and a
  resumed run replays it exactly (pipeline.py)."""

  def get_dataset(self, split="train", shuffle=True, seed=None,
                  shard_info=None, **unused) -> tf.data.Dataset:
    # One file per split: the task shuffles and shards its examples.
    del shuffle, seed, shard_info, unused
    return self._dataset_fn(split=split, shuffle_files=False)


def _dataset(split: str, shuffle_files: bool, *, splits: dict[str, Split],
             directory: str) -> tf.data.Dataset:
  """The source's raw examples of `split` before the task's preprocessor,
  in file order."""
  del shuffle_files  # One file per split.
  if split not in splits:
    raise errors.InputError(
        f"No {split!r} split: {directory}/{split}{SUFFIX} does not exist "
        f"(splits there: {', '.join(sorted(splits))}).")
  columns = splits[split]
  ds = tf.data.Dataset.from_tensor_slices({
      "image": columns.images, "where": columns.where,
      "prompt": columns.prompts, "has_prefix": columns.has_prefix,
      "id": columns.ids,
      "answers": tf.ragged.constant(columns.answers, dtype=tf.string)})

  def read_image(example):
    # An InputError raised in here comes back as itself from the pipeline.
    image = tf.numpy_function(
        lambda path, where: load_image(path.decode(), where.decode()),
        [example.pop("image"), example.pop("where")], tf.uint8,
        stateful=False)
    return {**example, "image": tf.ensure_shape(image, [None, None, 3])}

  return ds.map(read_image, num_parallel_calls=tf.data.AUTOTUNE)


def _prompt(example: dict) -> tf.Tensor:
  """The line's prefix, or PaliGemma's VQA prompt around its question."""
  return tf.where(example["has_prefix"], example["prompt"],
                  prompts.question({"question": example["prompt"]}))


def split_files(directory: str) -> dict[str, object]:
  """{split name: path} of the JSON-lines files in `directory`."""
  folder = storage.path(directory)
  if not folder.is_dir():
    raise errors.InputError(f"{directory!r} (config.data.jsonl.dir) is not a "
                            "directory.")
  files = {p.name[:-len(SUFFIX)]: p for p in folder.iterdir()
           if p.name.endswith(SUFFIX)}
  if not files:
    raise errors.InputError(f"{directory} holds no <split>{SUFFIX} file "
                            "(e.g. train.jsonl, validation.jsonl).")
  return files


def check_references(split: Split, metric: str) -> None:
  """Every example has the references `metric` needs: found when the files
  are read, not at the first evaluation after a whole run."""
  needed = metrics.MIN_REFERENCES.get(metric, 1)
  for answers, where in zip(split.answers, split.where):
    if len(answers) < needed:
      raise errors.InputError(
          f"{where}: metric {metric!r} needs at least {needed} answers per "
          f"example ('answers': [...]), this line has {len(answers)}; use "
          "exact_match for data with one answer per question.")


def register_jsonl_task(name: str, directory: str, metric: str) -> seqio.Task:
  """Registers task `name` over `directory`'s JSON-lines files, read and
  checked now; the same (name, directory, metric) again reads nothing."""
  if _REGISTERED.get(name) == (directory, metric):
    return seqio.get_mixture_or_task(name)
  metrics.get(metric)  # An unknown name fails before any reading.
  if name in seqio.TaskRegistry.names() and name not in _REGISTERED:
    raise errors.InputError(f"config.data.jsonl.name={name!r} is a built-in "
                            "task's name; choose another.")
  splits = {}
  for split, path in split_files(directory).items():
    splits[split] = read_split(path)
    check_references(splits[split], metric)
    check_images_exist(splits[split].images, splits[split].where)
  source = _Source(
      functools.partial(_dataset, splits=splits, directory=directory),
      splits=sorted(splits),
      num_input_examples={s: len(x.images) for s, x in splits.items()})
  task = tasks.register_vl_task(name, source, metric,
                                preprocessors=[prompts.raw_example(_prompt)])
  _REGISTERED[name] = (directory, metric)
  return task


def register_from_config(data_config) -> None:
  """Registers `config.data.jsonl` if it names a task (name and dir set)."""
  spec = data_config.jsonl
  if not spec.name:
    return
  if not spec.dir:
    raise errors.InputError(f"config.data.jsonl.name={spec.name!r} needs "
                            "config.data.jsonl.dir, the folder of its "
                            f"<split>{SUFFIX} files.")
  register_jsonl_task(spec.name, os.fspath(spec.dir), spec.metric)
