"""Checkpoints restore onto another mesh and survive an unreadable latest."""
import json
import logging
import shutil

import jax
import numpy as np

from omnismola.train import checkpoint as checkpoint_lib
from omnismola.train import optim
from omnismola.train import trainer
from test_trainer import tiny_config


def _abstract_and_init(config):
  mesh = trainer.partitioning.make_mesh(dict(config.mesh))
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
  step, restored, data = ckpt.restore_latest(abstract)
  ckpt.close()
  assert (step, data) == (7, {"batches_consumed": 7})
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  # Stacked [layers, embed, mlp]: the layer axis stays whole.
  kernel = restored.params["decoder"]["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp",
                                                            "tensor")


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(
    synthetic_data_dir, tmp_path, caplog, capsys):
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=6),
                             str(straight))
  run = tmp_path / "run"
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=4), str(run))
  shutil.rmtree(run / "checkpoints" / "4" / "state" / "d")  # Lost data files.
  capsys.readouterr()
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=6),
                               str(run))
  assert f"{run}/checkpoints/4 is unreadable" in caplog.text
  assert "Resuming from the checkpoint of step 2." in capsys.readouterr().out
  losses = lambda d: [json.loads(line)["loss"] for line in
                      (d / "train_metrics.jsonl").read_text().splitlines()]
  assert losses(run) == losses(straight)  # Steps 3 and 4 were redone.
