"""--mode=predict: one image file and a prompt, decoded as evaluation does."""
import subprocess
import sys

import numpy as np
from PIL import Image

from omnismola import predict, pretrained
from omnismola.data import pipeline
from omnismola.eval import decode
from omnismola.train import trainer
from test_trainer import tiny_config


def test_predict_matches_evaluation_decoding(synthetic_data_dir, tmp_path):
  """A validation example saved as a PNG and its prompt typed in give the
  answer evaluation decodes for that example."""
  config = tiny_config(synthetic_data_dir, steps=2)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)

  (eval_set,) = pipeline.make_eval_sets(config.data, batch_size=1,
                                        tasks=["synthetic_vqa"],
                                        max_examples=1)
  batch = next(eval_set.batches())
  pixels = np.round((batch["image"][0] + 1) * 127.5).astype(np.uint8)
  image_path = str(tmp_path / "example.png")
  Image.fromarray(pixels).save(image_path)
  prompt = pipeline.detokenize(batch["text"][0][batch["mask_input"][0] == 1])
  assert prompt.startswith("answer en ")

  answer = predict.predict(config, workdir, image_path, prompt)
  model = pretrained.from_pretrained(workdir)
  tokens = decode.generate(model, {k: batch[k] for k in decode.PROMPT_KEYS},
                           max_new_tokens=config.eval.max_new_tokens).tokens
  assert answer == pipeline.detokenize(tokens[0].tolist())


def test_predict_needs_image_and_prompt(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "omnismola.main", "--config=configs/mix.py",
       f"--workdir={tmp_path}", "--mode=predict", "--prompt=caption en"],
      capture_output=True, text=True, check=False)
  assert result.returncode != 0
  assert "--mode=predict needs --image and --prompt" in result.stderr
