"""SeqIO tasks of vision-language examples, and the metric of each task.

Every task's source yields (after the task's own preprocessors) raw examples
of image (uint8 [H, W, 3]), prefix (the prompt), suffix (the target) and
references (every answer the task's metric accepts); docs/data.md has the
format. `register_vl_task` tokenises them (`prompt_ids` for the prefix, EOS
after the suffix; the strings stay as *_pretokenized), scales the image to
[-1, 1] and records the task's metric, so the evaluator needs no per-task
code. Tasks are registered with the byte vocabulary; `get_task(name,
vocabulary)` gives the same task tokenised with another one
(config.data.vocabulary), so no task is registered twice.
"""
import functools
from typing import Sequence

import seqio
import tensorflow as tf

from omnismola.data.synthetic import builder
from omnismola.data.synthetic import scenes
from omnismola.eval import metrics

# Bytes + 3 special ids: pad 0, eos 1, unk 2; 259 ids in all. No tokenizer
# file to ship, and the synthetic texts are short.
VOCAB = seqio.ByteVocabulary()
EOS_ID = VOCAB.eos_id

BYTE = "byte"


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "prefix": seqio.Feature(vocabulary, add_eos=False),
      "suffix": seqio.Feature(vocabulary, add_eos=True),
      "image": seqio.ContinuousFeature(dtype=tf.float32, rank=3),
  }


# Task name -> name of its metric in omnismola.eval.metrics.METRICS.
TASK_METRICS: dict[str, str] = {}


# PaliGemma reads "BOS prompt \n" after the image, then writes the suffix;
# big_vision and transformers' PaliGemmaProcessor tokenise the "\n" on its
# own (Gemma's tokenizer has it as one piece).
PROMPT_SEPARATOR = "\n"


@functools.cache
def get_vocabulary(spec: str = BYTE) -> seqio.Vocabulary:
  """"byte" (the default) or the path of a SentencePiece model file, which
  needs pad id 0 (the converter pads with 0), an EOS, a BOS, and to keep
  "\\n": prompts are BOS prompt "\\n" (`prompt_ids`).
  """
  if spec == BYTE:
    return VOCAB
  vocabulary = seqio.SentencePieceVocabulary(spec)
  model = vocabulary.tokenizer  # Loads the file: a bad path fails here.
  if model.pad_id() != 0 or model.eos_id() < 0 or model.bos_id() < 0:
    raise ValueError(f"SentencePiece model {spec}: needs pad id 0, an EOS "
                     f"and a BOS id (Gemma's: pad 0, eos 1, bos 2); it has "
                     f"pad {model.pad_id()}, eos {model.eos_id()}, bos "
                     f"{model.bos_id()}.")
  if not model.encode(PROMPT_SEPARATOR):
    raise ValueError(f"SentencePiece model {spec}: encodes {PROMPT_SEPARATOR!r}"
                     " as nothing (its normalisation drops it), but "
                     "PaliGemma's prompts end with it; Gemma's tokenizer "
                     "keeps it as a piece.")
  return vocabulary


def prompt_ids(vocabulary: seqio.Vocabulary, prompt) -> tf.Tensor:
  """int32 ids of a prompt (string tensor) as the model reads it: with a
  SentencePiece vocabulary PaliGemma's BOS, prompt, "\\n"; with the byte
  vocabulary (no BOS) the prompt's bytes alone.
  """
  ids = tf.cast(vocabulary.encode_tf(prompt), tf.int32)
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return ids
  separator = tf.cast(vocabulary.encode_tf(PROMPT_SEPARATOR), tf.int32)
  return tf.concat([[vocabulary.tokenizer.bos_id()], ids, separator], 0)


def get_task(name: str, vocabulary: seqio.Vocabulary = VOCAB) -> seqio.Task:
  """Registered task `name`, tokenised with `vocabulary`: with another than
  the byte one, an unregistered copy of the task whose features use it."""
  task = seqio.get_mixture_or_task(name)
  if vocabulary is VOCAB:
    return task
  return seqio.Task(name, source=task.source,
                    output_features=output_features(vocabulary),
                    preprocessors=task.preprocessors,
                    shuffle_buffer_size=task.shuffle_buffer_size)


def image_in_model_range(image):
  """uint8 [0, 255] -> float32 [-1, 1], the range the model expects."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


@seqio.map_over_dataset
def image_to_float(example):
  return {**example, "image": image_in_model_range(example["image"])}


@seqio.map_over_dataset
def tokenize_text(example, output_features):
  """Encodes the text output features, keeping the strings as *_pretokenized.

  Unlike seqio.preprocessors.tokenize this leaves continuous features alone:
  that one would also copy every image into an `image_pretokenized` feature,
  doubling what the shuffle buffer holds.
  """
  example = dict(example)
  for key, feature in output_features.items():
    if isinstance(feature, seqio.ContinuousFeature):
      continue
    example[f"{key}_pretokenized"] = example[key]
    ids = tf.cast(prompt_ids(feature.vocabulary, example[key])
                  if key == "prefix" else
                  feature.vocabulary.encode_tf(example[key]), feature.dtype)
    if feature.add_eos:
      ids = tf.concat([ids, [feature.vocabulary.eos_id]], axis=0)
    example[key] = ids
  return example


def register_vl_task(name: str, source: seqio.DataSource, metric: str,
                     preprocessors: Sequence = ()) -> seqio.Task:
  """Registers a vision-language task and records its metric (a key of
  omnismola.eval.metrics.METRICS).

  `source` with `preprocessors` (applied first) must yield the raw example
  format of this module's docstring. Registering a name again replaces the
  task (notebooks re-run cells).
  """
  if metric not in metrics.METRICS:
    raise ValueError(f"Task {name!r}: unknown metric {metric!r}; metrics: "
                     f"{sorted(metrics.METRICS)}.")
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[*preprocessors, image_to_float, tokenize_text],
      output_features=output_features(VOCAB),
  )
  TASK_METRICS[name] = metric
  return task


def metric_of(task_name: str) -> str:
  """The metric name a task was registered with."""
  if task_name not in TASK_METRICS:
    raise ValueError(f"Task {task_name!r} was not registered with "
                     "omnismola.data.tasks.register_vl_task, so its metric is "
                     "unknown.")
  return TASK_METRICS[task_name]


for _task in scenes.TASKS:
  register_vl_task(
      f"synthetic_{_task}",
      # read_only: reading never generates data behind the user's back (and
      # never tries to fetch it); pipeline.prepare builds it explicitly.
      seqio.TfdsDataSource(tfds_name=builder.tfds_name(_task), read_only=True),
      metric=scenes.METRICS[_task])
