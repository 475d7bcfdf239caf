"""A folder of JSON-lines files as a task: reading, checking, and a tiny
model trained and evaluated on it through the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omnismola import config_lib
from omnismola import errors
from omnismola.data import jsonl
from omnismola.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_image(path, color, size=(40, 30)) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((*size, 3), color, np.uint8)).save(path)


def write_lines(path, records) -> None:
  with open(path, "w") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) +
              "\n")


def write_dataset(folder, sizes=(("train", 6), ("validation", 3),
                                 ("test", 2))) -> str:
  """Colour questions over solid images in <folder>/images; one example in
  each split uses a verbatim prefix, one an absolute image path."""
  for split, size in sizes:
    lines = []
    for i in range(size):
      name = list(COLORS)[i % len(COLORS)]
      image = f"images/{split}_{i}.png"
      write_image(os.path.join(folder, image), COLORS[name])
      line = {"image": image, "question": "what color is it?",
              "answers": [name, f"{name} color"], "id": f"{split}-{i}"}
      if i == 1:
        line = {"image": os.path.join(folder, image), "prefix": "caption en",
                "answer": name}
      lines.append(line)
    write_lines(os.path.join(folder, f"{split}.jsonl"), lines)
  return str(folder)


def data_config(folder, name="mydata", metric="exact_match"):
  c = config_lib.load_config_file("configs/mix.py:preset=tiny")
  c.data.jsonl = dict(name=name, dir=str(folder), metric=metric)
  c.data.mixture = name
  c.data.shuffle_buffer = 8
  return c.data


def test_eval_batches_hold_prompts_ids_and_every_reference(tmp_path):
  folder = write_dataset(tmp_path / "data")
  config = data_config(folder)
  (eval_set,) = pipeline.make_eval_sets(config, batch_size=4)
  assert eval_set.metric == "exact_match"
  batch = next(eval_set.batches())
  assert batch["ids"] == ["validation-0", "2", "validation-2", ""]
  assert batch["references"] == [["red", "red color"], ["green"],
                                 ["blue", "blue color"], []]
  prompts = [pipeline.detokenize(text[mask == 1])
             for text, mask in zip(batch["text"], batch["mask_input"])]
  assert prompts[:3] == ["answer en what color is it?", "caption en",
                         "answer en what color is it?"]
  assert batch["image"].shape == (4, 16, 16, 3)
  # A solid red image stays red after resizing to [-1, 1].
  np.testing.assert_allclose(batch["image"][0, 5, 5], [1, -1, -1], atol=1e-5)
  (test_set,) = pipeline.make_eval_sets(config, batch_size=4, split="test")
  assert next(test_set.batches())["ids"][:2] == ["test-0", "2"]


def test_training_targets_are_answers_and_registration_reads_once(tmp_path):
  folder = write_dataset(tmp_path / "data")
  config = data_config(folder)
  batches = pipeline.make_train_iterator(config, global_batch_size=6, seed=0)
  batch = next(batches)
  targets = {pipeline.detokenize(text[loss == 1])
             for text, loss in zip(batch["text"], batch["mask_loss"])}
  assert targets <= {f"{c}{s}" for c in COLORS for s in ("", " color")}
  # Asking again for the same task reads nothing: a removed file goes
  # unnoticed until the configuration changes.
  os.remove(os.path.join(folder, "images", "train_0.png"))
  pipeline.mixture_task_names(config)
  with pytest.raises(errors.InputError, match=r"train.jsonl:1: image .* "
                     "does not exist"):
    pipeline.mixture_task_names(data_config(folder, metric="anls"))


def test_a_metric_needing_several_answers_refuses_a_single_one(tmp_path):
  folder = write_dataset(tmp_path)
  with pytest.raises(errors.InputError,
                     match=r"\.jsonl:2: metric 'vqa_accuracy' needs at "
                     r"least 2 answers per example .* has 1"):
    pipeline.mixture_task_names(data_config(folder, metric="vqa_accuracy"))


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    ('["a list"]', r"bad.jsonl:2: a line must be a JSON object"),
    ({"question": "q", "answer": "a"}, r"bad.jsonl:2: missing field 'image'"),
    ({"image": "images/x.png", "answer": "a"},
     r"bad.jsonl:2: needs exactly one of the fields 'prefix' or 'question'"),
    ({"image": "images/x.png", "prefix": "p", "question": "q", "answer": "a"},
     r"bad.jsonl:2: needs exactly one of the fields 'prefix' or 'question'"),
    ({"image": "images/x.png", "prefix": "p"},
     r"bad.jsonl:2: needs exactly one of the fields 'answer' or 'answers'"),
    ({"image": "images/x.png", "prefix": "p", "answers": []},
     r"bad.jsonl:2: field 'answers' must be a non-empty list"),
    ({"image": "images/x.png", "prefix": {"a": 1}, "answer": "a"},
     r"bad.jsonl:2: field 'prefix' must be a string"),
    ({"image": "images/missing.png", "prefix": "p", "answer": "a"},
     r"bad.jsonl:2: image .*missing.png does not exist"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, message):
  write_image(tmp_path / "images" / "x.png", COLORS["red"])
  write_lines(tmp_path / "bad.jsonl",
              [{"image": "images/x.png", "prefix": "p", "answer": "a"}, line])
  with pytest.raises(errors.InputError, match=message):
    jsonl.register_jsonl_task("bad_lines", str(tmp_path), "exact_match")


def test_bad_folders_and_names_are_input_errors(tmp_path):
  with pytest.raises(errors.InputError, match="is not a directory"):
    jsonl.register_jsonl_task("nowhere", str(tmp_path / "nope"), "anls")
  with pytest.raises(errors.InputError, match="holds no <split>.jsonl"):
    jsonl.register_jsonl_task("empty", str(tmp_path), "anls")
  with pytest.raises(errors.InputError, match="Unknown metric 'bleu'; "
                     "metrics: anls, cider, exact_match"):
    jsonl.register_jsonl_task("x", str(tmp_path), "bleu")
  folder = write_dataset(tmp_path / "data", sizes=(("train", 2),))
  with pytest.raises(errors.InputError, match="built-in task"):
    jsonl.register_jsonl_task("synthetic_vqa", folder, "anls")
  with pytest.raises(errors.InputError, match=r"no 'validation' split"):
    pipeline.make_eval_sets(data_config(folder, name="only_train"),
                            batch_size=2)


def test_an_image_that_does_not_decode_is_named_when_read(tmp_path):
  folder = write_dataset(tmp_path / "data")
  with open(os.path.join(folder, "images", "validation_2.png"), "wb") as f:
    f.write(b"not a png")
  (eval_set,) = pipeline.make_eval_sets(data_config(folder, name="broken"),
                                        batch_size=4)
  with pytest.raises(errors.InputError, match=r"validation.jsonl:3: cannot "
                     r"decode image .*validation_2.png"):
    next(eval_set.batches())


TINY = ["--config.train.batch_size=4",
        "--config.train.steps=2", "--config.train.log_every=1",
        "--config.train.warmup_steps=0", "--config.data.shuffle_buffer=8",
        "--config.eval.batch_size=4", "--config.eval.max_new_tokens=4"]


def run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "omnismola.main",
       "--config=configs/mix.py:preset=tiny,experts_per_pool=1,rank=1", *TINY, *map(str, args)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_then_evaluate_the_test_split_through_main(tmp_path):
  folder = write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  data = ["--config.data.mixture=mydata", "--config.data.jsonl.name=mydata",
          f"--config.data.jsonl.dir={folder}",
          "--config.data.jsonl.metric=exact_match"]
  trained = run_main(f"--workdir={workdir}", *data)
  assert trained.returncode == 0, trained.stderr
  with open(workdir / "eval" / "metrics_2.json") as f:
    metrics = json.load(f)
  assert metrics["split"] == "validation"
  assert metrics["tasks"]["mydata"]["metric"] == "exact_match"
  assert metrics["tasks"]["mydata"]["num_examples"] == 3
  predictions = read_jsonl(workdir / "eval" / "predictions_mydata_2.jsonl")
  assert [p["id"] for p in predictions] == ["validation-0", "2",
                                            "validation-2"]
  assert predictions[1]["prompt"] == "caption en"
  assert predictions[2]["references"] == ["blue", "blue color"]
  assert all(isinstance(p["prediction"], str) for p in predictions)

  tested = run_main(f"--workdir={workdir}", "--mode=eval",
                    "--config.eval.split=test", *data)
  assert tested.returncode == 0, tested.stderr
  assert "Evaluation of the test split at step 2" in tested.stdout
  test_predictions = read_jsonl(
      workdir / "eval" / "predictions_mydata_test_2.jsonl")
  assert [p["id"] for p in test_predictions] == ["test-0", "2"]
  # The validation files are left as they were.
  assert read_jsonl(workdir / "eval" /
                    "predictions_mydata_2.jsonl") == predictions
