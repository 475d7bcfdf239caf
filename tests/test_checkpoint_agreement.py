"""config.model against the model of config.init.checkpoint.

The vocabulary size is the checkpoint's; any other shape that differs is
one error naming the fields; function-only fields stay the config's.
"""
import dataclasses

import ml_collections
import pytest

from omnismola import build
from omnismola import errors
from omnismola.models import presets
from omnismola.train import init

import tiny_paligemma
from tiny_paligemma import tiny_paligemma as tiny  # noqa: F401 (fixture)


def _fields(name="paligemma_3b_224", **overrides) -> dict:
  return dataclasses.asdict(presets.get_preset(name, **overrides))


def test_vocab_size_is_the_checkpoints():
  hf_rows = _fields(decoder_vocab_size=257_216)
  fields, notes = build.agree_with_checkpoint(_fields(), hf_rows)
  assert fields == hf_rows
  assert notes == ["config.model.decoder.vocab_size=257152 -> 257216: the "
                   "checkpoint's embedding has 257216 rows."]


def test_other_shapes_must_agree_and_are_named_together():
  with pytest.raises(ValueError) as e:
    build.agree_with_checkpoint(_fields(), _fields("paligemma_3b_448"))
  assert "config.model.vit.image_size=224 but the checkpoint's is 448" in str(
      e.value)
  with pytest.raises(ValueError) as e:
    build.agree_with_checkpoint(_fields(), _fields("paligemma2_3b_224"))
  for named in ("decoder.width=2048 but the checkpoint's is 2304",
                "decoder.depth=18 but the checkpoint's is 26",
                "decoder.post_norms=False but the checkpoint's is True"):
    assert named in str(e.value)


def test_function_only_fields_stay_the_configs():
  transfer = _fields("paligemma2_3b_224", decoder_final_logit_softcap=0.0)
  fields, notes = build.agree_with_checkpoint(
      transfer, _fields("paligemma2_3b_224"))
  assert fields == transfer
  assert notes == ["config.model.decoder.final_logit_softcap=0.0 differs "
                   "from the checkpoint's 30.0; the config's value is used."]


def _config(checkpoint: str, **model_overrides) -> ml_collections.ConfigDict:
  model = build.model_config_to_dict("paligemma_3b_224")
  tiny_model = dataclasses.asdict(build.vlm_config(_saved_model(checkpoint)))
  model.update(vit=tiny_model["vit"], decoder=dict(
      tiny_model["decoder"], vocab_size=tiny_paligemma.SP_PIECES,
      **model_overrides))
  return ml_collections.ConfigDict(dict(
      model=model, init=dict(checkpoint=checkpoint))).lock()


def _saved_model(checkpoint: str) -> dict:
  from omnismola import pretrained  # pylint: disable=g-import-not-at-top
  return pretrained.read_config(init.resolve_step_dir(checkpoint))["model"]


def test_a_run_config_takes_the_converted_vocab_size(tiny):
  config = _config(tiny.converted_dir)
  init.agree_with_checkpoint(config)
  assert config.model.decoder.vocab_size == tiny_paligemma.VOCAB_SIZE


def test_a_run_config_of_other_shapes_is_an_input_error(tiny):
  config = _config(tiny.converted_dir, width=64)
  with pytest.raises(errors.InputError,
                     match="config.model.decoder.width=64 but the "
                     "checkpoint's is 32"):
    init.agree_with_checkpoint(config)


def test_the_tokenizer_must_fit_the_embedding(tiny):
  from omnismola.data import tasks  # pylint: disable=g-import-not-at-top
  vocabulary = tasks.get_vocabulary(tiny.tokenizer)
  fields = _fields(decoder_vocab_size=tiny_paligemma.VOCAB_SIZE)
  build.check_vocabulary_fits(fields, vocabulary, tiny.tokenizer)
  fields["decoder"]["vocab_size"] = 300
  with pytest.raises(ValueError, match="has 384 tokens but config.model."
                     "decoder.vocab_size=300"):
    build.check_vocabulary_fits(fields, vocabulary, tiny.tokenizer)
