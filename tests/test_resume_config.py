"""A resumed run trains what its checkpoints' run trained, or stops first.

The learning rates expected are worked out by hand from the documented
schedule (docs/training.md), not recomputed with optim.py.
"""
import json
import math
import shutil

import numpy as np
import pytest

from omnismola import config_lib
from omnismola.train import optim
from omnismola.train import resume
from omnismola.train import trainer
from test_bad_input import snapshot
from test_trainer import tiny_config

LR = 1e-3  # configs/mix.py's.


def _mix(**train):
  config = config_lib.load_config_file("configs/mix.py")
  config.train.update(train)
  return config


def _saved(config) -> dict:
  """The config as a checkpoint holds it."""
  return json.loads(json.dumps(config.to_dict()))


def test_more_steps_of_a_decaying_schedule_stop_naming_the_field():
  with pytest.raises(resume.ConfigChangedError) as error:
    resume.resumed_config(_mix(steps=2000), _saved(_mix(steps=1000)), 1000)
  message = str(error.value)
  assert "train.steps: 1000 → 2000" in message
  assert "--config.train.extend=True" in message
  assert message.count("→") == 1


def test_a_constant_rate_trains_on_with_more_steps():
  saved = _saved(_mix(schedule="constant", steps=1000))
  resumed = resume.resumed_config(_mix(schedule="constant", steps=2000),
                                  saved, 1000)
  assert (resumed.train.steps, resumed.train.schedule_start) == (2000, 0)


def test_a_change_of_what_is_trained_stops_even_when_extending():
  config = _mix(batch_size=64, steps=2000, extend=True)
  config.seed = 1
  config.model.decoder.width *= 2
  with pytest.raises(resume.ConfigChangedError) as error:
    resume.resumed_config(config, _saved(_mix()), 500)
  message = str(error.value)
  width = _mix().model.decoder.width
  for change in ("train.batch_size: 32 → 64", "seed: 0 → 1",
                 f"model.decoder.width: {width} → {2 * width}",
                 "train.steps: 1000 → 2000"):
    assert change in message
  assert "--config.init.checkpoint" in message


def test_layout_logging_and_evaluation_may_change():
  config = _mix(log_every=1, checkpoint_every=7, keep_checkpoints=1,
                microbatches=2, compute_dtype="bfloat16")
  config.mesh.fsdp, config.mesh.data = 2, 4
  config.eval.every = 5
  config.data.tfds_data_dir = "/elsewhere"
  resumed = resume.resumed_config(config, _saved(_mix()), 500)
  assert (resumed.train.log_every, resumed.mesh.fsdp) == (1, 2)


def test_extend_starts_one_segment_that_later_resumes_keep():
  saved = _saved(_mix(steps=1000))
  extended = resume.resumed_config(_mix(steps=2000, extend=True), saved, 1000)
  assert extended.train.schedule_start == 1000
  # The same command again, or without the switch, from a later checkpoint.
  for extend in (True, False):
    again = resume.resumed_config(_mix(steps=2000, extend=extend),
                                  _saved(extended), 1500)
    assert again.train.schedule_start == 1000
  with pytest.raises(resume.ConfigChangedError, match="nothing to train"):
    resume.resumed_config(_mix(steps=1000, lr=1e-4, extend=True), saved, 1000)


def test_a_checkpoint_from_before_segments_resumes():
  saved = _saved(_mix())
  del saved["train"]["schedule_start"], saved["train"]["extend"]
  assert resume.resumed_config(_mix(), saved, 500).train.schedule_start == 0


def test_a_segment_warms_up_and_decays_from_its_start():
  schedule = optim.learning_rate_schedule(
      _mix(lr=1.0, warmup_steps=2, steps=10, schedule_start=6).train)
  # 4 steps from step 6: warm-up 0, 1/2; cosine over 2 steps: 1, 1/2.
  np.testing.assert_allclose([schedule(t) for t in range(6, 10)],
                             [0, 0.5, 1, 0.5], atol=1e-7)


@pytest.fixture(scope="module", name="finished_run")
def _finished_run(synthetic_data_dir, tmp_path_factory):
  """A finished 4-step cosine run (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp("finished")
  trainer.train_and_evaluate(
      tiny_config(synthetic_data_dir, steps=4, schedule="cosine"),
      str(workdir))
  return workdir


def _copy(finished_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  return run


def _logged(run, key: str) -> dict[int, float]:
  with open(run / "train_metrics.jsonl") as f:
    return {r["step"]: r[key] for r in map(json.loads, f)}


@pytest.mark.parametrize("change, model, named", [
    (dict(steps=6), {}, "train.steps: 4 → 6"),
    (dict(batch_size=16), {}, "train.batch_size: 8 → 16"),
    # Other shapes than the checkpoint's: the same stop, no shape error.
    ({}, dict(width=48), "model.decoder.width: 32 → 48")])
def test_a_changed_run_stops_before_anything_is_written(
    finished_run, synthetic_data_dir, tmp_path, change, model, named):
  run = _copy(finished_run, tmp_path)
  before = snapshot(run)
  config = tiny_config(synthetic_data_dir, schedule="cosine", **change)
  config.model.decoder.update(model)
  with pytest.raises(resume.ConfigChangedError, match=named):
    trainer.train_and_evaluate(config, str(run))
  assert snapshot(run) == before


def test_extend_trains_a_new_segment_that_a_later_resume_keeps(
    finished_run, synthetic_data_dir, tmp_path):
  run = _copy(finished_run, tmp_path)
  extend = dict(steps=8, warmup_steps=2, schedule="cosine")
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, extend=True,
                                         **extend), str(run))
  # Step t trains with the rate at t - 1. Steps 1-4: cosine over 4 steps;
  # 5-8: a segment from step 4, warm-up over 2 steps, cosine over 2.
  first = [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
  np.testing.assert_allclose(list(_logged(run, "learning_rate").values()),
                             np.multiply(first + [0, 0.5, 1, 0.5], LR),
                             rtol=1e-6, atol=1e-12)
  with open(run / "checkpoints" / "6" / "config" / "metadata") as f:
    assert json.load(f)["train"]["schedule_start"] == 4

  # Died after step 6: the same schedule without the switch, and a log
  # line every 2 steps, resumes; step 8's line averages steps 7 and 8.
  losses = _logged(run, "loss")
  shutil.rmtree(run / "checkpoints" / "8")
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, log_every=2,
                                         **extend), str(run))
  assert _logged(run, "learning_rate")[8] == pytest.approx(0.75 * LR)
  assert _logged(run, "loss")[8] == pytest.approx(
      (losses[7] + losses[8]) / 2, rel=1e-6)
  assert sorted(_logged(run, "loss")) == [1, 2, 3, 4, 5, 6, 8]
