"""Bad input on the real path: one clear error each, exit code != 0, nothing
written or deleted.

Every case runs the documented command line (`python -m omnismola.main` or
`python -m omnismola.convert`) in a subprocess and checks the three promises
with `assert_fails_cleanly`.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args, env=None, timeout=300):
  """`python -m module args...` from the repository root."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)],
                        cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def snapshot(*folders) -> dict:
  """{path: (size, mtime_ns)} of every file under `folders` (absent: {})."""
  files = {}
  for folder in folders:
    for parent, _, names in os.walk(folder):
      for name in names:
        p = os.path.join(parent, name)
        st = os.stat(p)
        files[p] = (st.st_size, st.st_mtime_ns)
  return files


def assert_fails_cleanly(result, before: dict, after: dict, *expected):
  """Exit code != 0, no traceback, `expected` phrases in stderr, and the
  watched folders unchanged (nothing written, nothing deleted)."""
  message = result.stderr
  assert result.returncode != 0, (result.stdout, message)
  assert "Traceback" not in message, message
  for phrase in expected:
    assert phrase in message, (phrase, message)
  assert after == before, "files changed: " + str(
      set(after.items()) ^ set(before.items()))


# Resuming a workdir with a config that changes what the run trains.

TINY_RUN = ("--config=configs/mix.py:preset=tiny,experts_per_pool=1,rank=1",
            "--config.model.vit.image_size=64", "--config.train.steps=2",
            "--config.train.batch_size=8", "--config.train.log_every=1",
            "--config.eval.at_end=False")


@pytest.fixture(scope="module", name="finished_tiny_run")
def _finished_tiny_run(synthetic_data_dir, tmp_path_factory):
  """(workdir, command line) of a finished 2-step run."""
  workdir = tmp_path_factory.mktemp("finished_tiny_run")
  command = (*TINY_RUN, f"--config.data.tfds_data_dir={synthetic_data_dir}",
             f"--workdir={workdir}")
  result = run_module("omnismola.main", *command)
  assert result.returncode == 0, result.stderr
  return workdir, command


# The slow suite: the fixture's run compiles SMoLA's train step in a fresh
# process (a minute on 2 cores). The default suite has the stop in
# test_resume_config.py::test_a_changed_run_stops_before_anything_is_written
# (the same three kinds of change, the real trainer, nothing written) and
# the command line's clean failure on an InputError (which
# ConfigChangedError is) in the other tests here.
@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    ("--config.train.steps=4", "train.steps: 2 → 4"),
    ("--config.train.batch_size=16", "train.batch_size: 8 → 16"),
    ("--config.model.decoder.width=48", "model.decoder.width: 32 → 48")])
def test_resume_with_a_changed_config(finished_tiny_run, change, named):
  workdir, command = finished_tiny_run
  before = snapshot(workdir)
  result = run_module("omnismola.main", *command, change)
  assert_fails_cleanly(result, before, snapshot(workdir), named,
                       "The checkpoint of step 2")


# A pretrained PaliGemma that does not fit the config, the tokenizer or the
# converter (the tiny one of tests/tiny_paligemma.py).

from tiny_paligemma import tiny_paligemma  # noqa: E402,F401 (a fixture)

PALIGEMMA_RUN = ("--config=configs/mix.py:preset=paligemma_3b_224,"
                 "frozen_backbone=True", "--config.train.steps=1")


def test_a_preset_of_other_shapes_than_the_checkpoint(tiny_paligemma,
                                                      tmp_path):
  workdir = tmp_path / "run"
  before = snapshot(tmp_path, tiny_paligemma.converted_dir)
  result = run_module(
      "omnismola.main", *PALIGEMMA_RUN, f"--workdir={workdir}",
      f"--config.init.checkpoint={tiny_paligemma.converted_dir}",
      f"--config.data.vocabulary={tiny_paligemma.tokenizer}")
  assert_fails_cleanly(result, before,
                       snapshot(tmp_path, tiny_paligemma.converted_dir),
                       "config.model.decoder.width=2048 but the "
                       "checkpoint's is 32",
                       "config.model.vit.image_size=224 but the "
                       "checkpoint's is 32")
  assert [line.startswith("error:") for line in
          result.stderr.splitlines()].count(True) == 1
  assert not workdir.exists()


def test_a_tokenizer_larger_than_the_checkpoints_embedding(tiny_paligemma,
                                                           tmp_path):
  """A checkpoint with 300 embedding rows, a tokenizer of 384 pieces."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from omnismola import convert  # pylint: disable=g-import-not-at-top
  with np.load(tiny_paligemma.big_vision_npz) as npz:
    arrays = dict(npz)
  key = "llm/embedder/input_embedding"
  arrays[key] = arrays[key][:300]
  np.savez(tmp_path / "small_vocab.npz", **arrays)
  checkpoint = convert.convert("big_vision", str(tmp_path / "small_vocab.npz"),
                               str(tmp_path / "small_vocab"))
  workdir = tmp_path / "run"
  before = snapshot(tmp_path)
  # The tiny preset with the checkpoint's shapes: only the vocabulary is off.
  shapes = [f"--config.model.{tower}.{k}={v}"
            for tower, fields in dict(
                vit=dict(image_size=32, patch_size=8, width=32, depth=2,
                         num_heads=2, mlp_dim=64),
                decoder=dict(width=32, depth=2, num_heads=2, num_kv_heads=1,
                             head_dim=16, mlp_dim=64)).items()
            for k, v in fields.items()]
  result = run_module(
      "omnismola.main", "--config=configs/mix.py:preset=tiny",
      f"--workdir={workdir}", f"--config.init.checkpoint={checkpoint}",
      *shapes, f"--config.data.vocabulary={tiny_paligemma.tokenizer}")
  assert_fails_cleanly(result, before, snapshot(tmp_path),
                       "has 384 tokens but config.model.decoder.vocab_size"
                       "=300")
  assert not workdir.exists()


def _garbled_hf_dir(tiny_paligemma, root):
  garbled = root / "garbled_hf"
  garbled.mkdir()
  (garbled / "config.json").write_text(
      open(os.path.join(tiny_paligemma.hf_dir, "config.json")).read())
  (garbled / "model.safetensors").write_bytes(os.urandom(4096))
  return garbled


@pytest.mark.parametrize("source, make_input, named", [
    ("hf_paligemma", lambda tiny, root: root / "nowhere", "no config.json"),
    ("hf_paligemma", _garbled_hf_dir, "is not a safetensors file"),
    ("big_vision", lambda tiny, root: root / "nowhere.npz",
     "No such file"),
    ("big_vision", lambda tiny, root: (root / "x.npz").write_bytes(
        os.urandom(4096)) and root / "x.npz", "is not an .npz archive"),
])
def test_convert_a_missing_or_garbled_input(tiny_paligemma, tmp_path, source,
                                            make_input, named):
  path = make_input(tiny_paligemma, tmp_path)
  output = tmp_path / "out"
  before = snapshot(tmp_path)
  result = run_module("omnismola.convert", f"--from={source}",
                      f"--input={path}", f"--output={output}")
  assert_fails_cleanly(result, before, snapshot(tmp_path), named)
  assert not output.exists()


def test_predict_a_prompt_longer_than_the_prefix_under_error(tiny_paligemma,
                                                             tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = tmp_path / "image.png"
  Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
  before = snapshot(tmp_path, tiny_paligemma.converted_dir)
  result = run_module(
      "omnismola.main", "--config=configs/mix.py:preset=paligemma_3b_224",
      f"--workdir={tiny_paligemma.converted_dir}", "--mode=predict",
      f"--image={image}", "--prompt=answer en what color is the square",
      "--config.model.vit.image_size=32",
      f"--config.data.vocabulary={tiny_paligemma.tokenizer}",
      "--config.data.truncation=error",
      "--config.data.feature_lengths.prefix=4")
  assert_fails_cleanly(result, before,
                       snapshot(tmp_path, tiny_paligemma.converted_dir),
                       "config.data.feature_lengths.prefix=4",
                       "config.data.truncation='error'")


# Storage URLs (docs/training.md, "Storage"): a bucket that is missing or
# cannot be reached, and a data dir TensorFlow cannot read through an
# emulator. Nothing may be written locally either (a URL taken for a local
# path becomes the folder `gs:`).

from test_storage_gcs import free_port  # noqa: E402
from test_storage_gcs import gcs  # noqa: E402,F401 (a fixture)

STORAGE_RUN = ("--config=configs/mix.py:preset=tiny,experts_per_pool=1,rank=1",
               "--config.train.steps=1")
LOCAL_GS = os.path.join(ROOT, "gs:")  # The runs' cwd is ROOT.


def test_a_workdir_in_a_missing_bucket(gcs):
  before = snapshot(LOCAL_GS)
  result = run_module("omnismola.main", *STORAGE_RUN,
                      "--workdir=gs://no-such-bucket/run",
                      env=dict(STORAGE_EMULATOR_HOST=gcs))
  assert_fails_cleanly(result, before, snapshot(LOCAL_GS),
                       "gs://no-such-bucket/run", "does not exist")


@pytest.mark.slow  # The client retries for about half a minute.
def test_a_workdir_in_an_unreachable_bucket():
  """An error once the storage client's retries are spent, not a hang."""
  before = snapshot(LOCAL_GS)
  result = run_module(
      "omnismola.main", *STORAGE_RUN, "--workdir=gs://bucket/run",
      env=dict(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{free_port()}"),
      timeout=180)
  assert_fails_cleanly(result, before, snapshot(LOCAL_GS),
                       "gs://bucket/run: cannot reach gs://bucket")


def test_a_data_dir_in_an_emulated_bucket(gcs, tmp_path):
  workdir = tmp_path / "run"
  before = snapshot(LOCAL_GS, tmp_path)
  result = run_module("omnismola.main", *STORAGE_RUN, f"--workdir={workdir}",
                      "--config.data.tfds_data_dir=gs://bucket/tfds",
                      env=dict(STORAGE_EMULATOR_HOST=gcs))
  assert_fails_cleanly(result, before, snapshot(LOCAL_GS, tmp_path),
                       "gs://bucket/tfds", "TensorFlow cannot read gs://")
  assert not workdir.exists()


# Your data as JSON-lines files (config.data.jsonl), prompt files
# (--predict_file) and zero-shot evaluation (no checkpoint in the workdir).

JSONL_RUN = ("--config=configs/mix.py:preset=tiny,experts_per_pool=1,rank=1",
             "--config.train.steps=1", "--config.data.mixture=mydata",
             "--config.data.jsonl.name=mydata")
GOOD_LINE = {"image": "images/red.png", "question": "what color?",
             "answer": "red"}


def _write_jsonl(path, lines) -> None:
  import json  # pylint: disable=g-import-not-at-top
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _jsonl_folder(folder, second_line=GOOD_LINE,
                  splits=("train", "validation")) -> str:
  """A folder with images/red.png and <split>.jsonl files of two lines, the
  second of train.jsonl `second_line`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(folder / "images")
  Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "images" / "red.png")
  for split in splits:
    _write_jsonl(folder / f"{split}.jsonl",
                 [GOOD_LINE, second_line if split == "train" else GOOD_LINE])
  return str(folder)


@pytest.mark.parametrize("line, named", [
    ("{not json", ("train.jsonl:2: not valid JSON",)),
    ({"question": "q", "answer": "a"},
     ("train.jsonl:2: missing field 'image'",)),
    ({"image": "images/blue.png", "question": "q", "answer": "a"},
     ("train.jsonl:2: image ", "blue.png does not exist")),
])
def test_training_on_a_bad_jsonl_line(tmp_path, line, named):
  data = _jsonl_folder(tmp_path / "data", line)
  before = snapshot(tmp_path)
  result = run_module("omnismola.main", *JSONL_RUN,
                      f"--workdir={tmp_path / 'run'}",
                      f"--config.data.jsonl.dir={data}")
  assert_fails_cleanly(result, before, snapshot(tmp_path), *named)


@pytest.mark.parametrize("override, named", [
    ("--config.data.mixture=no_such_task",
     ("'no_such_task' is neither a registered SeqIO mixture nor a task",)),
    ("--config.data.jsonl.metric=bleu",
     ("Unknown metric 'bleu'", "vqa_accuracy")),
])
def test_an_unknown_task_or_metric(tmp_path, override, named):
  data = _jsonl_folder(tmp_path / "data")
  before = snapshot(tmp_path)
  result = run_module("omnismola.main", *JSONL_RUN,
                      f"--workdir={tmp_path / 'run'}",
                      f"--config.data.jsonl.dir={data}", override)
  assert_fails_cleanly(result, before, snapshot(tmp_path), *named)


def test_evaluating_a_split_the_folder_lacks(tmp_path):
  data = _jsonl_folder(tmp_path / "data")
  before = snapshot(tmp_path)
  result = run_module("omnismola.main", *JSONL_RUN, "--mode=eval",
                      f"--workdir={tmp_path / 'run'}",
                      f"--config.data.jsonl.dir={data}",
                      "--config.eval.split=test")
  assert_fails_cleanly(result, before, snapshot(tmp_path),
                       "Task 'mydata' has no 'test' split",
                       "'train', 'validation'")


def test_evaluating_without_any_checkpoint(tmp_path):
  data = _jsonl_folder(tmp_path / "data")
  before = snapshot(tmp_path)
  result = run_module("omnismola.main", *JSONL_RUN, "--mode=eval",
                      f"--workdir={tmp_path / 'run'}",
                      f"--config.data.jsonl.dir={data}")
  assert_fails_cleanly(result, before, snapshot(tmp_path),
                       "No checkpoint in", "--config.init.checkpoint=DIR")


def test_zero_shot_eval_of_an_image_that_does_not_decode(tiny_paligemma,
                                                        tmp_path):
  data = _jsonl_folder(tmp_path / "data")
  (tmp_path / "data" / "images" / "red.png").write_bytes(b"not a png")
  before = snapshot(tmp_path, tiny_paligemma.converted_dir)
  # The tiny preset with the checkpoint's shapes.
  shapes = [f"--config.model.{tower}.{k}={v}"
            for tower, fields in dict(
                vit=dict(image_size=32, patch_size=8, width=32, depth=2,
                         num_heads=2, mlp_dim=64),
                decoder=dict(width=32, depth=2, num_heads=2, num_kv_heads=1,
                             head_dim=16, mlp_dim=64, vocab_size=448)).items()
            for k, v in fields.items()]
  result = run_module(
      "omnismola.main", "--config=configs/mix.py:preset=tiny", *shapes,
      f"--workdir={tmp_path / 'run'}", "--mode=eval",
      f"--config.init.checkpoint={tiny_paligemma.converted_dir}",
      f"--config.data.vocabulary={tiny_paligemma.tokenizer}",
      "--config.data.mixture=mydata", "--config.data.jsonl.name=mydata",
      f"--config.data.jsonl.dir={data}")
  assert_fails_cleanly(result, before,
                       snapshot(tmp_path, tiny_paligemma.converted_dir),
                       "validation.jsonl:1: cannot decode image",
                       "red.png")


@pytest.mark.parametrize("lines, named", [
    (['{"image": "images/red.png", "prompt": "caption en"}', "{oops"],
     ("prompts.jsonl:2: not valid JSON",)),
    ([{"image": "images/red.png"}],
     ("prompts.jsonl:1: missing field 'prompt'",)),
    ([{"image": "images/blue.png", "prompt": "caption en"}],
     ("prompts.jsonl:1: image ", "blue.png does not exist")),
    ([{"image": "images/red.png", "prompt": "caption en"}],
     ("No checkpoint in", "--config.init.checkpoint=DIR")),
])
def test_predicting_a_bad_prompt_file(tmp_path, lines, named):
  _jsonl_folder(tmp_path / "data")
  prompts = tmp_path / "data" / "prompts.jsonl"
  _write_jsonl(prompts, lines)
  before = snapshot(tmp_path)
  result = run_module(
      "omnismola.main", *JSONL_RUN[:2], "--mode=predict",
      f"--workdir={tmp_path / 'run'}", f"--predict_file={prompts}")
  assert_fails_cleanly(result, before, snapshot(tmp_path), *named)
