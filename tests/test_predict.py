"""--mode=predict and zero-shot evaluation: prompts on image files, and a
pretrained checkpoint used as it is, decoded as evaluation does."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omnismola import config_lib
from omnismola import errors
from omnismola import predict, pretrained
from omnismola.data import pipeline
from omnismola.eval import decode
from omnismola.train import trainer
from test_trainer import tiny_config


@pytest.fixture(scope="module")
def pretrained_dir(synthetic_data_dir, tmp_path_factory):
  """A tiny model without experts trained 2 steps: the "pretrained" one."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=2),
                             workdir)
  return workdir


def eval_config(data_dir, *, experts: bool = False, **init):
  """tiny_config evaluating 8 synthetic_vqa examples; `experts` attaches a
  SMoLA pool of one expert per modality (fresh: B = 0, no effect)."""
  config = tiny_config(data_dir)
  if experts:
    config.experts = config_lib.load_config_file(
        "configs/mix.py:preset=tiny,experts_per_pool=1,rank=1").experts
  config.eval.update(dict(batch_size=8, max_examples=8, max_new_tokens=4,
                          tasks=("synthetic_vqa",)))
  config.init.update(init)
  return config


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def save_eval_images(config, folder, count):
  """(image file, prompt) of the first `count` synthetic_vqa validation
  examples, the images saved as PNGs in `folder`."""
  (eval_set,) = pipeline.make_eval_sets(config.data, batch_size=count,
                                        tasks=["synthetic_vqa"],
                                        max_examples=count)
  batch = next(eval_set.batches())
  os.makedirs(folder, exist_ok=True)
  examples = []
  for i in range(count):
    pixels = np.round((batch["image"][i] + 1) * 127.5).astype(np.uint8)
    path = os.path.join(folder, f"example_{i}.png")
    Image.fromarray(pixels).save(path)
    prompt = pipeline.detokenize(batch["text"][i][batch["mask_input"][i] == 1])
    examples.append((path, prompt))
  return examples, batch


def test_predict_matches_evaluation_decoding(synthetic_data_dir,
                                             pretrained_dir, tmp_path):
  """A validation example saved as a PNG and its prompt typed in give the
  answer evaluation decodes for that example."""
  config = tiny_config(synthetic_data_dir)
  ((image_path, prompt),), batch = save_eval_images(config, tmp_path, 1)
  assert prompt.startswith("answer en ")

  answer = predict.predict(config, pretrained_dir, image_path, prompt)
  model = pretrained.from_pretrained(pretrained_dir)
  tokens = decode.generate(model, {k: batch[k] for k in decode.PROMPT_KEYS},
                           max_new_tokens=config.eval.max_new_tokens).tokens
  assert answer == pipeline.detokenize(tokens[0].tolist())


def test_zero_shot_eval_with_fresh_experts_equals_the_pretrained_model(
    synthetic_data_dir, pretrained_dir, tmp_path):
  """A workdir without checkpoints evaluates config.init.checkpoint's
  parameters (step 0); fresh SMoLA experts change no prediction."""
  own = trainer.evaluate_checkpoint(eval_config(synthetic_data_dir),
                                    pretrained_dir)
  zero_shot_dir = tmp_path / "zero_shot"
  zero_shot = trainer.evaluate_checkpoint(
      eval_config(synthetic_data_dir, experts=True,
                  checkpoint=pretrained_dir), str(zero_shot_dir))
  assert zero_shot == own
  with open(zero_shot_dir / "eval" / "metrics_0.json") as f:
    assert json.load(f)["tasks"] == zero_shot
  records = read_jsonl(zero_shot_dir / "eval" /
                       "predictions_synthetic_vqa_0.jsonl")
  assert records == read_jsonl(os.path.join(
      pretrained_dir, "eval", "predictions_synthetic_vqa_2.jsonl"))
  assert [r["id"] for r in records] == list(range(8))
  assert all(r["prompt"].startswith("answer en ") and r["references"]
             for r in records)
  assert [r["prediction"] for r in records[:5]] == [
      e["prediction"] for e in zero_shot["synthetic_vqa"]["examples"]]
  assert not os.path.exists(zero_shot_dir / "checkpoints")


def test_workdir_checkpoint_takes_precedence_and_eval_split_picks_the_split(
    synthetic_data_dir, pretrained_dir, tmp_path, capsys):
  config = eval_config(synthetic_data_dir, checkpoint=str(tmp_path / "no"))
  config.eval.split = "train"
  results = trainer.evaluate_checkpoint(config, pretrained_dir)
  assert "it takes precedence over config.init.checkpoint" in (
      capsys.readouterr().out)
  with open(os.path.join(pretrained_dir, "eval",
                         "metrics_train_2.json")) as f:
    written = json.load(f)
  assert written["split"] == "train" and written["tasks"] == results
  train_prompts = [r["prompt"] for r in read_jsonl(os.path.join(
      pretrained_dir, "eval", "predictions_synthetic_vqa_train_2.jsonl"))]
  validation_prompts = [r["prompt"] for r in read_jsonl(os.path.join(
      pretrained_dir, "eval", "predictions_synthetic_vqa_2.jsonl"))]
  assert train_prompts != validation_prompts


def test_a_prompt_file_is_answered_in_order_as_single_prompts_are(
    synthetic_data_dir, pretrained_dir, tmp_path):
  """Three lines, decoded two at a time (one padded batch); relative image
  paths; the zero-shot model with fresh experts answers the same."""
  config = eval_config(synthetic_data_dir)
  config.eval.batch_size = 2
  examples, _ = save_eval_images(config, tmp_path / "in" / "images", 3)
  lines = [{"image": os.path.relpath(path, tmp_path / "in"),
            "prompt": prompt} for path, prompt in examples]
  lines[0]["id"] = "first"
  prompt_file = tmp_path / "in" / "prompts.jsonl"
  prompt_file.write_text("".join(json.dumps(line) + "\n" for line in lines))

  output = predict.predict_file(config, pretrained_dir, str(prompt_file))
  assert output == os.path.join(pretrained_dir, "predictions",
                                "prompts.jsonl")
  answers = read_jsonl(output)
  assert [a["id"] for a in answers] == ["first", "2", "3"]
  assert [a["prompt"] for a in answers] == [p for _, p in examples]
  assert [a["image"] for a in answers] == [path for path, _ in examples]
  assert [a["prediction"] for a in answers] == [
      predict.predict(config, pretrained_dir, path, prompt)
      for path, prompt in examples]

  zero_shot = eval_config(synthetic_data_dir, experts=True,
                          checkpoint=pretrained_dir)
  zero_shot.eval.batch_size = 2
  elsewhere = str(tmp_path / "zero_shot.jsonl")
  assert predict.predict_file(zero_shot, str(tmp_path / "empty"),
                              str(prompt_file), elsewhere) == elsewhere
  assert read_jsonl(elsewhere) == answers
  assert not os.path.exists(tmp_path / "empty")


def test_predict_needs_image_and_prompt(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "omnismola.main", "--config=configs/mix.py",
       f"--workdir={tmp_path}", "--mode=predict", "--prompt=caption en"],
      capture_output=True, text=True, check=False)
  assert result.returncode != 0
  assert "--mode=predict needs --image and --prompt" in result.stderr


def test_predict_without_a_checkpoint_rejects_init_parts(tmp_path):
  config = tiny_config()
  config.init.parts = (("vit", str(tmp_path / "other"), "vit"),)
  with pytest.raises(errors.InputError, match=r"init\.parts composes a model "
                     r"only for training and --mode=eval"):
    predict.load_model(config, str(tmp_path))
