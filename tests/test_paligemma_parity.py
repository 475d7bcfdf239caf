"""A converted PaliGemma answers exactly as transformers' does.

Image files and prompts go through omnismola's own preprocessing (the
`pipeline.prompt_batch` that --mode=predict uses, laid out by the
evaluation converter) and greedy decoding of the model `omnismola.convert`
made from a tiny random Hugging Face PaliGemma; the same files go through
transformers' `PaliGemmaProcessor` (GemmaTokenizer of the same
SentencePiece model, SiglipImageProcessor at the model's size) and
`generate(do_sample=False)`. The generated token ids must be identical.
"""
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny_paligemma
from tiny_paligemma import tiny_paligemma as tiny  # noqa: F401 (fixture)

from omnismola import pretrained
from omnismola import schema
from omnismola.data import pipeline
from omnismola.eval import decode

MAX_NEW_TOKENS = 8
PREFIX_LENGTH = 24
# (height, width) of each image: non-square ones are resized by both sides.
CASES = [((48, 80), "caption en"),
         ((64, 64), "answer en what color is the star?"),
         ((90, 40), "describe the image\nhow many shapes are there 12")]


def _image(height: int, width: int, seed: int) -> np.ndarray:
  """A smooth uint8 picture with some noise (a resize has work to do)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  image = np.stack([128 + 100 * np.sin(6 * x + 3 * y + seed),
                    128 + 90 * np.cos(5 * y - seed), 255 * x * (1 - y)], -1)
  return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(
      np.uint8)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """[(image path, prompt)]."""
  root = tmp_path_factory.mktemp("images")
  out = []
  for i, (shape, prompt) in enumerate(CASES):
    path = str(root / f"{i}.png")
    Image.fromarray(_image(*shape, seed=i)).save(path)
    out.append((path, prompt))
  return out


def _data_config(tokenizer: str) -> ml_collections.ConfigDict:
  return schema.data_config(
      vocabulary=tokenizer, image_size=tiny_paligemma.IMAGE_SIZE,
      feature_lengths=dict(prefix=PREFIX_LENGTH, suffix=8),
      truncation="error")


def _processor(tokenizer: str) -> transformers.PaliGemmaProcessor:
  images = transformers.SiglipImageProcessor(
      size=dict(height=tiny_paligemma.IMAGE_SIZE,
                width=tiny_paligemma.IMAGE_SIZE))
  images.image_seq_length = tiny_paligemma.NUM_IMAGE_TOKENS
  processor = transformers.PaliGemmaProcessor(
      image_processor=images,
      tokenizer=tiny_paligemma.hf_tokenizer(tokenizer))
  assert processor.image_token_id == tiny_paligemma.IMAGE_TOKEN
  return processor


def _hf_generate(model, processor, path: str, prompt: str):
  """(prompt ids after the image tokens, pixels [H, W, 3], new ids)."""
  inputs = processor(images=Image.open(path).convert("RGB"),
                     text="<image>" + prompt, return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS,
                         do_sample=False)
  length = inputs["input_ids"].shape[1]
  new = out[0, length:].tolist()
  if tiny_paligemma.EOS in new:
    new = new[:new.index(tiny_paligemma.EOS) + 1]
  return (inputs["input_ids"][0, tiny_paligemma.NUM_IMAGE_TOKENS:].tolist(),
          inputs["pixel_values"][0].numpy().transpose(1, 2, 0), new)


def _ours_generate(model, data_config, path: str, prompt: str):
  """(prompt ids, pixels [H, W, 3], new ids up to and with EOS)."""
  batch = pipeline.prompt_batch(data_config, path, prompt)
  tokens = decode.generate(model, batch, max_new_tokens=MAX_NEW_TOKENS,
                           eos_id=tiny_paligemma.EOS).tokens[0].tolist()
  if tiny_paligemma.EOS in tokens:
    tokens = tokens[:tokens.index(tiny_paligemma.EOS) + 1]
  ids = batch["text"][0][batch["mask_input"][0] == 1].tolist()
  return ids, batch["image"][0], tokens


def test_greedy_generations_match_transformers(tiny, cases):
  hf_model = tiny.hf_model()
  processor = _processor(tiny.tokenizer)
  model = pretrained.from_pretrained(tiny.converted_dir)
  data_config = _data_config(tiny.tokenizer)
  generated = []
  for path, prompt in cases:
    hf_ids, hf_pixels, hf_new = _hf_generate(hf_model, processor, path,
                                             prompt)
    ids, pixels, new = _ours_generate(model, data_config, path, prompt)
    assert ids == hf_ids, (prompt, ids, hf_ids)
    assert ids[0] == tiny_paligemma.BOS and ids[-1] == tiny_paligemma.NEWLINE
    # TF's bicubic resize vs PIL's, which rounds to uint8: a level or two.
    np.testing.assert_allclose(pixels, hf_pixels, atol=2.5 / 127.5)
    assert new == hf_new, (prompt, new, hf_new)
    generated.append(new)
  # Not a vacuous comparison: varied tokens, not an immediate EOS.
  assert all(len(g) > 2 for g in generated), generated
  assert len({t for g in generated for t in g}) >= 5, generated
  assert len({tuple(g) for g in generated}) == len(cases), generated
