"""PaliGemma-style prompts: a stored benchmark example -> the raw example.

A prompt function maps a manual.FEATURES example to the prefix string. The
prefixes follow PaliGemma's transfers (big_vision), so a converted
PaliGemma checkpoint sees the prompts it was trained on. `raw_example`
builds the task preprocessor: the target is one of the references drawn
with the task's seed (the model learns every valid answer, in proportion to
how often annotators gave it), the references are all of them, and the
official id names the example in prediction files.
"""
from typing import Callable

import seqio
import tensorflow as tf

Prompt = Callable[[dict], tf.Tensor]

# Between the choices of a multiple-choice prompt (PaliGemma's AI2D).
CHOICE_SEPARATOR = " \t "


def caption(example: dict) -> tf.Tensor:
  del example  # The same prompt for every image.
  return tf.constant("caption en")


def question(example: dict) -> tf.Tensor:
  return tf.strings.join(["answer en ", example["question"]])


def choice(example: dict) -> tf.Tensor:
  context = example["context"]
  context = tf.where(tf.strings.length(context) > 0,
                     tf.strings.join([" context: ", context]), "")
  return tf.strings.join([
      "answer en ", example["question"], context, " choose from: ",
      tf.strings.reduce_join(example["choices"], separator=CHOICE_SEPARATOR)])


def raw_example(prompt: Prompt):
  """The preprocessor turning stored examples into raw examples."""

  @seqio.map_over_dataset(num_seeds=1)
  def to_raw(example, seed):
    answers = example["answers"]
    pick = tf.random.stateless_uniform([], seed, maxval=tf.size(answers),
                                       dtype=tf.int32)
    return {"image": example["image"], "prefix": prompt(example),
            "suffix": answers[pick], "references": answers,
            "id": example["id"]}

  return to_raw
