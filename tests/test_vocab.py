"""config.data.vocabulary: the byte default and SentencePiece models.

The SentencePiece model is trained here, on a few hundred sentences, with
Gemma's special ids (pad 0, eos 1); no tokenizer file ships with the tests.
"""
import ml_collections
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from omnismola.data import pipeline
from omnismola.data import tasks

_COLORS = ("red", "green", "blue", "gold", "cyan", "pink")
_SHAPES = ("square", "circle", "triangle", "star")


def _sentences() -> list[str]:
  return [f"answer en what color is the {shape} number {i}? {color}"
          for i in range(12) for shape in _SHAPES for color in _COLORS]


def _train(path, **ids) -> str:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_sentences()), model_prefix=str(path),
      vocab_size=64, character_coverage=1.0, hard_vocab_limit=False, **ids)
  return f"{path}.model"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  """A tiny model with Gemma's layout of special ids."""
  return _train(tmp_path_factory.mktemp("sp") / "tiny", pad_id=0, eos_id=1,
                unk_id=2, bos_id=-1)


def test_byte_is_the_default():
  assert tasks.get_vocabulary() is tasks.VOCAB
  assert pipeline.get_vocabulary(ml_collections.ConfigDict()) is tasks.VOCAB
  assert tasks.get_task("synthetic_ocr") is seqio.get_mixture_or_task(
      "synthetic_ocr")


def test_sentencepiece_round_trip(sp_model):
  vocabulary = tasks.get_vocabulary(sp_model)
  assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
  assert tasks.get_vocabulary(sp_model) is vocabulary  # Loaded once.
  assert vocabulary.eos_id == 1 and vocabulary.vocab_size < 259
  for text in ["answer en what color is the star number 3?", "gold",
               "blue circle"]:
    ids = vocabulary.encode(text)
    assert ids and 0 not in ids and vocabulary.decode(ids) == text
    # Decoding stops at EOS and drops padding, as predictions need.
    assert pipeline.detokenize(ids + [1, 7, 0, 0], vocabulary) == text


def test_sentencepiece_model_needs_pad_zero(tmp_path):
  default_ids = _train(tmp_path / "t5_like")  # unk 0, bos 1, eos 2, no pad.
  with pytest.raises(ValueError, match="needs pad id 0"):
    tasks.get_vocabulary(default_ids)


def _register_numbers_task():
  """A task of 12 examples "answer en what color is the star number i?"."""

  def examples(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(dict(
        image=np.zeros((12, 20, 30, 3), np.uint8),
        prefix=[f"answer en what color is the star number {i}?"
                for i in range(12)],
        suffix=[_COLORS[i % 6] for i in range(12)],
        references=[[_COLORS[i % 6]] for i in range(12)]))

  tasks.register_vl_task("vocab_numbers", seqio.FunctionDataSource(
      examples, splits=["train", "validation"]), metric="exact_match")


def test_tasks_tokenize_with_the_vocabulary(sp_model):
  _register_numbers_task()
  vocabulary = tasks.get_vocabulary(sp_model)
  task = tasks.get_task("vocab_numbers", vocabulary)
  assert "vocab_numbers" in seqio.TaskRegistry.names()
  assert seqio.get_mixture_or_task("vocab_numbers") is not task
  for x in task.get_dataset(sequence_length=None, split="validation",
                            shuffle=False).take(3).as_numpy_iterator():
    prefix = x["prefix_pretokenized"].decode()
    suffix = x["suffix_pretokenized"].decode()
    assert x["prefix"].tolist() == vocabulary.encode(prefix)
    assert x["suffix"].tolist() == vocabulary.encode(suffix) + [1]


def test_pipeline_uses_the_configured_vocabulary(sp_model, tmp_path):
  _register_numbers_task()
  config = ml_collections.ConfigDict(dict(
      mixture="vocab_numbers", task_modules=(), tfds_data_dir=str(tmp_path),
      feature_lengths=dict(prefix=48, suffix=8), shuffle_buffer=12,
      vocabulary=sp_model, image_size=16))
  vocabulary = pipeline.get_vocabulary(config)
  batch = next(pipeline.make_train_iterator(config, global_batch_size=4,
                                            seed=0))
  assert batch["image"].shape == (4, 16, 16, 3)
  for row in range(4):
    text = batch["text"][row]
    prompt = pipeline.detokenize(text[batch["mask_ar"][row] == 0], vocabulary)
    answer = pipeline.detokenize(text[batch["mask_loss"][row] == 1],
                                 vocabulary)
    number = int(prompt.split()[-1].rstrip("?"))
    assert answer == _COLORS[number % 6]
  (numbers,) = pipeline.make_eval_sets(config, batch_size=12)
  (b,) = list(numbers.batches())
  assert pipeline.detokenize(b["text"][0], vocabulary).startswith(
      "answer en what color is the star number")
