"""Hugging Face PaliGemma import: logits parity with transformers on PyTorch.

Tiny random `PaliGemmaForConditionalGeneration` models (Gemma 1 and Gemma 2
language models, grouped-query attention, a Gemma 2 sliding window shorter
than the sequence) are saved with `save_pretrained`, converted, and their
text-position logits compared with ours on the same inputs.
"""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
from safetensors.numpy import save_file

import orbax.checkpoint as ocp

from omnismola import config_lib, convert, pretrained
from omnismola.train import trainer
from omnismola.models.convert import hf_paligemma, safetensors_io

IMAGE_SIZE, PATCH = 64, 16       # 16 image tokens; the synthetic data's size.
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH)**2
VOCAB, IMAGE_TOKEN = 300, 299

TEXT_CONFIGS = {
    "gemma": dict(model_type="gemma", hidden_size=48, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
    # A window of 8 < 16 image tokens + text: the window really bites.
    "gemma2": dict(model_type="gemma2", hidden_size=48, intermediate_size=96,
                   num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                   query_pre_attn_scalar=24, sliding_window=8,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def _hf_model(text: str, seed: int = 0):
  config = transformers.PaliGemmaConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2,
                         image_size=IMAGE_SIZE, patch_size=PATCH,
                         projection_dim=48, vision_use_head=False),
      text_config=TEXT_CONFIGS[text], image_token_index=IMAGE_TOKEN,
      projection_dim=48)
  torch.manual_seed(seed)
  model = transformers.PaliGemmaForConditionalGeneration(config)
  # The default init (std 0.02, unit norms) makes near-zero logits where
  # any mismatch would hide; every weight gets a sizeable random value.
  with torch.no_grad():
    for param in model.parameters():
      param.copy_(torch.randn_like(param) * 0.15)
  return model.eval()


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def converted(request, tmp_path_factory):
  """(text config name, HF model, converted directory)."""
  root = tmp_path_factory.mktemp(request.param)
  model = _hf_model(request.param)
  model.save_pretrained(root / "hf")
  convert.convert("hf_paligemma", str(root / "hf"), str(root / "ours"))
  return request.param, model, str(root / "ours")


def _inputs(batch=3, length=12, seed=0):
  """Image, text and masks; example 1 ends in padding, prefixes differ."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3))
  text = rng.integers(3, IMAGE_TOKEN, (batch, length))
  mask_ar = np.zeros((batch, length), np.int64)
  for b, prefix in enumerate([5, 3, 8][:batch]):
    mask_ar[b, prefix:] = 1
  mask_input = np.ones((batch, length), np.int64)
  mask_input[1, -4:] = 0
  return image.astype(np.float32), text, mask_ar, mask_input


def _hf_logits(model, image, text, mask_ar, mask_input):
  """transformers' logits at the text positions (image tokens in front)."""
  batch = text.shape[0]
  image_ids = np.full((batch, NUM_IMAGE_TOKENS), IMAGE_TOKEN)
  ones = np.ones((batch, NUM_IMAGE_TOKENS), np.int64)
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(np.concatenate([image_ids, text], 1)),
        pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)),
        attention_mask=torch.tensor(np.concatenate([ones, mask_input], 1)),
        token_type_ids=torch.tensor(np.concatenate([0 * ones, mask_ar], 1)))
  return out.logits.numpy()[:, NUM_IMAGE_TOKENS:]


def _our_logits(model, image, text, mask_ar, mask_input):
  as_int = lambda x: jnp.asarray(x, jnp.int32)
  return np.asarray(model(jnp.asarray(image), as_int(text), as_int(mask_ar),
                          as_int(mask_input)))


def test_logits_match_transformers(converted):
  name, hf, directory = converted
  ours_model = pretrained.from_pretrained(directory)
  assert ours_model.config.decoder.post_norms == (name == "gemma2")
  inputs = _inputs()
  want = _hf_logits(hf, *inputs)
  got = _our_logits(ours_model, *inputs)
  valid = inputs[3].astype(bool)
  assert np.abs(want[valid]).max() > 1.0  # Not a vacuous comparison.
  np.testing.assert_array_less(np.abs(got[valid] - want[valid]).max(), 1e-4)


def test_fresh_zero_initialised_experts_keep_the_logits(converted):
  _, hf, directory = converted
  smola = dict(kind="smola", pools=dict(text=2, image=2, all=2), rank=2,
               targets=r"decoder/layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))")
  model = pretrained.from_pretrained(directory, experts=[smola])
  assert model.decoder.layers.attn.q.adapters is not None
  inputs = _inputs(seed=1)
  valid = inputs[3].astype(bool)
  diff = np.abs(_our_logits(model, *inputs) - _hf_logits(hf, *inputs))
  assert diff[valid].max() <= 1e-4


def test_converted_directory_layout_and_config(converted):
  name, hf, directory = converted
  step = os.path.join(directory, "checkpoints", "0")
  config = pretrained.read_config(step)
  assert config["experts"] == []
  decoder = config["model"]["decoder"]
  text = TEXT_CONFIGS[name]
  assert (decoder["depth"], decoder["num_heads"], decoder["num_kv_heads"]) == (
      text["num_hidden_layers"], 4, 2)
  assert decoder["sliding_window"] == text.get("sliding_window", 0)
  assert config["model"]["vit"]["image_size"] == IMAGE_SIZE
  # A second conversion into the same place refuses to overwrite it.
  with pytest.raises(FileExistsError):
    convert.convert("hf_paligemma",
                    os.path.join(os.path.dirname(directory), "hf"), directory)


def test_hub_key_layouts_convert_alike(tmp_path):
  """Older (vision_model.) and newer (model.) prefixes give the same params."""
  hf = _hf_model("gemma")
  hf.save_pretrained(tmp_path / "saved")
  weights = safetensors_io.read_checkpoint(str(tmp_path / "saved"))
  rename = {
      "old": lambda k: k.replace("vision_tower.", "vision_tower.vision_model."),
      "new": lambda k: ("model." + k.replace("language_model.model.",
                                             "language_model.")),
  }
  _, reference = hf_paligemma.load(str(tmp_path / "saved"))
  for layout, fn in rename.items():
    directory = tmp_path / layout
    directory.mkdir()
    save_file({fn(k): np.array(v) for k, v in weights.items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        (tmp_path / "saved" / "config.json").read_text())
    _, params = hf_paligemma.load(str(directory))
    params, want = dict(_flatten(params)), dict(_flatten(reference))
    assert params.keys() == want.keys()
    for key, value in want.items():
      np.testing.assert_array_equal(params[key], value)


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def test_bfloat16_checkpoints_read_without_torch_numpy(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  values = torch.randn(3, 5).to(torch.bfloat16)
  save_file({"w": values}, str(tmp_path / "model.safetensors"))
  read = safetensors_io.read_checkpoint(str(tmp_path))["w"]
  assert str(read.dtype) == "bfloat16"
  np.testing.assert_array_equal(read.astype(np.float32),
                                values.float().numpy())


def test_bad_checkpoints_fail_clearly(tmp_path):
  hf = _hf_model("gemma")
  hf.save_pretrained(tmp_path / "hf")
  weights = safetensors_io.read_checkpoint(str(tmp_path / "hf"))
  broken = {k: np.array(v) for k, v in weights.items()
            if "layers.1.mlp.up_proj" not in k}
  save_file(broken, str(tmp_path / "hf" / "model.safetensors"))
  with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
    hf_paligemma.load(str(tmp_path / "hf"))
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config["model_type"] = "llava"
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="not 'paligemma'"):
    hf_paligemma.load(str(tmp_path / "hf"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_paligemma.load(str(tmp_path))


def test_command_line(tmp_path):
  hf_dir = tmp_path / "hf"
  _hf_model("gemma").save_pretrained(hf_dir)
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "omnismola.convert", *args],
      capture_output=True, text=True, check=False)
  ok = run("--from=hf_paligemma", f"--input={hf_dir}",
           f"--output={tmp_path / 'cli'}")
  assert ok.returncode == 0, ok.stderr
  assert "--config.init.checkpoint=" in ok.stdout + ok.stderr
  assert os.path.isdir(tmp_path / "cli" / "checkpoints" / "0" / "state")
  bad = run("--from=hf_paligemma", f"--input={tmp_path / 'nowhere'}",
            f"--output={tmp_path / 'x'}")
  assert bad.returncode != 0 and "config.json" in bad.stderr


# The trainer's init path is the same for both text configs (their own
# parts are checked above: logits, fresh experts, layout): Gemma 2's run is
# in the slow suite.
@pytest.mark.parametrize(
    "converted", ["gemma", pytest.param("gemma2", marks=pytest.mark.slow)],
    indirect=True)
def test_converted_checkpoint_initialises_training(converted,
                                                   synthetic_data_dir,
                                                   tmp_path):
  """--config.init.checkpoint=DIR: backbone loaded, SMoLA experts fresh."""
  _, _, directory = converted
  c = config_lib.load_config_file(
      "configs/mix.py:experts_per_pool=2,rank=2,frozen_backbone=True")
  c.unlock()
  c.model = pretrained.read_config(
      os.path.join(directory, "checkpoints", "0"))["model"]
  # The config's SMoLA entry on q and k (k: the grouped key/value heads'
  # shape), not all seven linears: the same init path, and SMoLA's train
  # step compiles for every linear it adapts (a minute on 2 cores for all
  # seven). All seven on a converted model:
  # test_fresh_zero_initialised_experts_keep_the_logits.
  c.experts = [dict(c.experts[0], targets=r"decoder/layers/\d+/attn/(q|k)")]
  c.lock()
  c.init.checkpoint = directory
  c.data.tfds_data_dir = str(synthetic_data_dir)
  c.data.shuffle_buffer = 64
  c.train.update(dict(steps=2, batch_size=4, log_every=1, checkpoint_every=2,
                      warmup_steps=0))
  c.eval.at_end = False
  trainer.train_and_evaluate(c, str(tmp_path / "run"))

  saved = ocp.StandardCheckpointer().restore(
      str(tmp_path / "run" / "checkpoints" / "2" / "state"))
  source = ocp.StandardCheckpointer().restore(
      os.path.join(directory, "checkpoints", "0", "state"))["params"]
  frozen = saved["frozen"]  # The whole backbone: trainable = adapters only.
  np.testing.assert_array_equal(
      frozen["decoder"]["layers"]["attn"]["q"]["kernel"],
      source["decoder"]["layers"]["attn"]["q"]["kernel"])
  np.testing.assert_array_equal(frozen["vit"]["pos_embedding"],
                                source["vit"]["pos_embedding"])
  for name in ("q", "k"):
    adapters = saved["params"]["decoder"]["layers"]["attn"][name]["adapters"]
    assert "smola_0" in adapters
