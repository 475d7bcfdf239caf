"""config.data.vocabulary: the byte default and SentencePiece models.

The SentencePiece model is trained here, on a few hundred sentences, with
Gemma's special ids (pad 0, eos 1, bos 2, unk 3); no tokenizer file ships
with the tests.
"""
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from omnismola import schema
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
                bos_id=2, unk_id=3, user_defined_symbols=["\n"])


def test_byte_is_the_default():
  assert tasks.get_vocabulary() is tasks.VOCAB
  assert pipeline.get_vocabulary(schema.data_config()) is tasks.VOCAB
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


def test_sentencepiece_model_needs_bos(tmp_path):
  no_bos = _train(tmp_path / "no_bos", pad_id=0, eos_id=1, unk_id=2,
                  bos_id=-1)
  with pytest.raises(ValueError, match="BOS id.*bos -1"):
    tasks.get_vocabulary(no_bos)


def test_sentencepiece_model_must_keep_newlines(tmp_path):
  drops_newlines = _train(tmp_path / "nfkc", pad_id=0, eos_id=1, bos_id=2,
                          unk_id=3)
  with pytest.raises(ValueError, match="encodes '\\\\n' as nothing"):
    tasks.get_vocabulary(drops_newlines)


def test_prompt_ids_per_vocabulary(sp_model):
  """SentencePiece: PaliGemma's BOS prompt "\\n"; bytes: the bytes alone."""
  prompt = "answer en what color is the star number 3?"
  vocabulary = tasks.get_vocabulary(sp_model)
  ids = tasks.prompt_ids(vocabulary, tf.constant(prompt)).numpy().tolist()
  assert ids == [2] + vocabulary.encode(prompt) + vocabulary.encode("\n")
  assert tasks.prompt_ids(tasks.VOCAB, tf.constant(prompt)).numpy().tolist(
  ) == tasks.VOCAB.encode(prompt)


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
    assert x["prefix"].tolist() == (
        [2] + vocabulary.encode(prefix) + vocabulary.encode("\n"))
    assert x["suffix"].tolist() == vocabulary.encode(suffix) + [1]


def test_pipeline_uses_the_configured_vocabulary(sp_model, tmp_path):
  _register_numbers_task()
  config = schema.data_config(
      mixture="vocab_numbers", tfds_data_dir=str(tmp_path),
      feature_lengths=dict(prefix=48, suffix=8), shuffle_buffer=12,
      vocabulary=sp_model, image_size=16)
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


def test_packed_rows_keep_each_prompts_bos_and_newline(sp_model, tmp_path):
  """Packing moves whole examples: each starts with BOS, its prefix ends
  with "\\n", and only its suffix carries the loss."""
  _register_numbers_task()
  config = schema.data_config(
      mixture="vocab_numbers", tfds_data_dir=str(tmp_path),
      feature_lengths=dict(prefix=48, suffix=8), shuffle_buffer=12,
      vocabulary=sp_model, image_size=16,
      packing=dict(examples=3, text_length=120, window=8))
  vocabulary = pipeline.get_vocabulary(config)
  newline = vocabulary.encode("\n")
  batch = next(pipeline.make_train_iterator(config, global_batch_size=2,
                                            seed=0))
  examples = 0
  for row in range(2):
    segments = batch["segment_ids"][row]
    for segment in set(segments.tolist()) - {0}:
      mine = segments == segment
      text, mask_ar = batch["text"][row][mine], batch["mask_ar"][row][mine]
      prefix = text[mask_ar == 0].tolist()
      assert prefix[0] == 2 and prefix[-len(newline):] == newline
      assert (batch["mask_loss"][row][mine] == mask_ar).all()
      examples += 1
  assert examples > 2  # Rows really hold several examples.
