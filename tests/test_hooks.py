"""The training loop's hooks (train/hooks.py, guards.py): each acts at its
steps, and a guard stops the run only after a streak of non-finite steps."""
import itertools
import json

import numpy as np
import pytest

from omnismola.train import guards
from omnismola.train import hooks
from omnismola.train import logging as log_lib


def test_checkpoints_every_n_steps_and_after_the_last():
  saved = []
  hook = hooks.checkpoint(3, 7, lambda step, state: saved.append((step,
                                                                  state)))
  for step in range(1, 8):
    hook(step, f"state {step}", {})
  assert saved == [(3, "state 3"), (6, "state 6"), (7, "state 7")]


def _clock(times):
  return iter(times).__next__


def test_evaluates_before_the_last_step_only_and_its_time_is_not_trained():
  evaluated = []
  # Evaluations take 100 s each (t = 1-101, 102-202): 5 steps in 5 s.
  progress = log_lib.Progress(0, 6, 4, tokens_per_row=1, flops_per_row=0,
                              num_devices=1, peak_flops=None,
                              clock=_clock([0.0, 1.0, 101.0, 102.0, 202.0,
                                            205.0]))
  progress.start(1)
  hook = hooks.evaluate(2, 6, lambda step, state: evaluated.append(step),
                        progress)
  for step in range(1, 7):
    hook(step, None, {})
  assert evaluated == [2, 4]  # Step 6, the last, the caller evaluates.
  assert progress.update(6)["steps_per_sec"] == 1.0
  never = hooks.evaluate(0, 6, lambda step, state: evaluated.append(step),
                         progress)
  never(2, None, {})
  assert evaluated == [2, 4]


def _metrics(loss, nonfinite=0):
  return dict(loss=np.float32(loss), grad_norm=np.float32(1),
              learning_rate=np.float32(0.1), aux_loss=np.float32(0),
              nonfinite=np.int32(nonfinite), target_tokens=np.int32(10),
              examples=np.int32(4), task_nll=np.array([loss * 10, 0.0]),
              task_tokens=np.array([10, 0]))


def test_log_writes_the_steps_since_the_last_line(tmp_path, capsys):
  progress = log_lib.Progress(0, 5, 4, tokens_per_row=1, flops_per_row=0,
                              num_devices=1, peak_flops=None,
                              clock=itertools.count().__next__)
  writer = log_lib.MetricWriter(tmp_path)
  hook = hooks.log(2, 5, ["vqa", "ocr"], progress, writer,
                   lambda: {"input/over_length": 0.0})
  losses = {1: 1.0, 2: 3.0, 3: 5.0, 4: 100.0, 5: 7.0}
  for step, loss in losses.items():
    hook(step, None, _metrics(loss, nonfinite=step == 4))
  writer.close()
  lines = [json.loads(line)
           for line in (tmp_path / "train_metrics.jsonl").read_text()
           .splitlines()]
  assert [r["step"] for r in lines] == [2, 4, 5]
  # Step 4 was skipped (non-finite): counted, not averaged.
  assert [r["loss"] for r in lines] == [2.0, 5.0, 7.0]
  assert [r["skipped_steps"] for r in lines] == [0, 1, 0]
  assert lines[0]["loss/vqa"] == 2.0 and "loss/ocr" not in lines[0]
  assert lines[0]["input/over_length"] == 0.0
  # Rates start after step 1 (its compilation): step 2 from t = 0 to 1.
  assert lines[0]["steps_per_sec"] == 1.0
  assert capsys.readouterr().out.splitlines()[0].startswith("step 2/5")


def test_the_guard_stops_after_a_streak_read_one_step_late():
  guard = guards.NonFiniteGuard(2)
  for step, flag in enumerate([1, 0, 1, 1], start=1):
    guard(step, None, {"nonfinite": np.int32(flag)})  # Reads step - 1's.
  assert guard.streak == 1
  with pytest.raises(guards.NonFiniteError, match="Steps 3-4"):
    guard.flush()
