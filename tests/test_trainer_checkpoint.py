"""Checkpoints restore onto another mesh and lose nothing to a failed read.

Faults are injected: a read that fails once, a file cut short, a save that
never committed, a metrics line torn by a crash.
"""
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from omnismola.train import checkpoint as checkpoint_lib
from omnismola.train import logging as log_lib
from omnismola.train import optim
from omnismola.train import partitioning
from omnismola.train import trainer
from test_trainer import tiny_config


def _abstract_and_init(config):
  mesh = partitioning.make_mesh(dict(config.mesh))
  init_fn, abstract, _ = trainer.create_state(
      config, mesh, optim.make_optimizer(config.train))
  return abstract, init_fn


def test_restore_onto_a_different_mesh(tmp_path):
  config = tiny_config()
  config.mesh = dict(data=8, fsdp=1, tensor=1, expert=1)
  _, init_fn = _abstract_and_init(config)
  saved = init_fn(jax.random.key(1))
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=1)
  ckpt.save(7, saved, {"batches_consumed": 7}, config.to_dict())
  ckpt.close()

  config.mesh = dict(data=1, fsdp=4, tensor=2, expert=1)
  abstract, _ = _abstract_and_init(config)
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=1)
  step, restored, data, saved_config = ckpt.restore_latest(abstract)
  ckpt.close()
  assert (step, data) == (7, {"batches_consumed": 7})
  assert saved_config["mesh"]["data"] == 8
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  # Stacked [layers, embed, mlp]: the layer axis stays whole.
  kernel = restored.params["decoder"]["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp",
                                                            "tensor")


def _cut_short(step_dir) -> None:
  """Truncates every array data file (TensorStore's `d/` folders) of a
  checkpoint's state to half, as a copy interrupted midway would leave it."""
  for parent, _, names in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(parent) == "d":
      for name in names:
        path = os.path.join(parent, name)
        os.truncate(path, os.path.getsize(path) // 2)


@pytest.fixture(name="steps_2_and_4")
def _steps_2_and_4(tmp_path):
  """(directory, abstract state, the saved state) of checkpoints 2 and 4."""
  config = tiny_config()
  abstract, init_fn = _abstract_and_init(config)
  state = init_fn(jax.random.key(0))
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3)
  for step in (2, 4):
    ckpt.save(step, state, {"batches_consumed": step}, config.to_dict())
  ckpt.close()
  return tmp_path, abstract, state


def test_a_read_that_fails_once_is_retried(steps_2_and_4, monkeypatch,
                                           caplog):
  directory, abstract, state = steps_2_and_4
  monkeypatch.setattr(checkpoint_lib, "RETRY_SECONDS", 0)
  restore, failures = ocp.CompositeCheckpointHandler.restore, []

  def fail_once(self, path, args):
    if "state" in args and not failures:
      failures.append(path)
      raise OSError("storage unavailable for a moment")
    return restore(self, path, args)

  monkeypatch.setattr(ocp.CompositeCheckpointHandler, "restore", fail_once)
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  with caplog.at_level(logging.WARNING):
    step, restored, _, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert failures == [directory / "4"] and step == 4
  assert "unreadable" not in caplog.text
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_a_file_cut_short_falls_back_and_keeps_the_checkpoint(
    steps_2_and_4, monkeypatch, caplog):
  directory, abstract, state = steps_2_and_4
  monkeypatch.setattr(checkpoint_lib, "RETRY_SECONDS", 0)
  _cut_short(directory / "4")
  before = sorted(os.listdir(directory / "4" / "state"))
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  with caplog.at_level(logging.WARNING):
    step, _, data, _ = ckpt.restore_latest(abstract)
  assert (step, data) == (2, {"batches_consumed": 2})
  assert f"{directory}/4 is unreadable" in caplog.text
  assert "keeping it" in caplog.text
  assert sorted(os.listdir(directory / "4" / "state")) == before
  # The run trains to step 4 again: its save replaces the broken one. A save
  # of the step it resumed from (SIGTERM at once) keeps that one.
  ckpt.save(2, state, {"batches_consumed": 2}, {})
  ckpt.save(4, state, {"batches_consumed": 4}, {"again": True})
  ckpt.close()
  assert "Replacing" in caplog.text
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  step, _, _, saved_config = ckpt.restore_latest(abstract)
  ckpt.close()
  assert (step, saved_config) == (4, {"again": True})
  assert "mesh" in json.loads((directory / "2" / "config" / "metadata"
                               ).read_text())


def test_no_readable_checkpoint_raises_the_newest_error(steps_2_and_4,
                                                        monkeypatch):
  directory, abstract, _ = steps_2_and_4
  monkeypatch.setattr(checkpoint_lib, "RETRY_SECONDS", 0)
  for step in (2, 4):
    _cut_short(directory / str(step))
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  with pytest.raises(Exception) as error:
    ckpt.restore_latest(abstract)
  ckpt.close()
  assert f"{directory}/4/" in str(error.value)  # The newest step's error.
  assert sorted(os.listdir(directory)) == ["2", "4"]


def test_an_uncommitted_save_is_cleaned_by_a_writer_only(steps_2_and_4):
  directory, _, state = steps_2_and_4
  unfinished = directory / "6.orbax-checkpoint-tmp-1733000000000000"
  shutil.copytree(directory / "4", unfinished)
  checkpoint_lib.Checkpointer(directory, keep=3, read_only=True).close()
  assert unfinished.exists()  # An evaluation touches nothing.
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  assert ckpt.latest_step() == 4
  ckpt.save(6, state, {"batches_consumed": 6}, {})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["2", "4", "6"]


def test_close_waits_for_the_cleanup_of_a_dead_runs_saves(tmp_path):
  # A run that stops before its first save (a changed config on resume)
  # closes right away; were orbax's cleanup thread still running, the
  # process would exit under it and print a traceback at shutdown.
  unfinished = [tmp_path / f"{step}.orbax-checkpoint-tmp-1733000000000000"
                for step in range(300)]
  for path in unfinished:
    path.mkdir()
  checkpoint_lib.Checkpointer(tmp_path, keep=3).close()
  assert not any(path.exists() for path in unfinished)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
  path = tmp_path / "train_metrics.jsonl"
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
  path.write_text("\n".join(lines) + '\n{"step": 4, "lo')
  with caplog.at_level(logging.WARNING):
    log_lib.truncate_after(str(path), 2)
  assert path.read_text() == "\n".join(lines[:2]) + "\n"
  assert "line 4, cut short" in caplog.text


def test_training_resumes_before_an_unreadable_checkpoint(
    synthetic_data_dir, tmp_path, capsys):
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=6),
                             str(straight))
  run = tmp_path / "run"
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=4), str(run))
  _cut_short(run / "checkpoints" / "4")
  with open(run / "train_metrics.jsonl", "a") as f:
    f.write('{"step": 5, "loss"')  # A crash while writing the next line.
  capsys.readouterr()
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=6),
                             str(run))
  assert "Resuming from the checkpoint of step 2." in capsys.readouterr().out
  lines = lambda d: (d / "train_metrics.jsonl").read_text().splitlines()
  losses = lambda d: [json.loads(line)["loss"] for line in lines(d)]
  assert losses(run) == losses(straight)  # Steps 3 and 4 were redone.
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]
