"""The train step: microbatches, bf16 compute, lr multipliers, the NaN guard."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from omnismola.train import checkpoint as checkpoint_lib
from omnismola.train import guards
from omnismola.train import host_shards
from omnismola.train import optim
from omnismola.train import partitioning
from omnismola.train import trainer
import checks
from test_trainer import tiny_config


def _batch(batch=8, length=20):
  rng = np.random.default_rng(0)
  suffix = np.tile((np.arange(length) >= length // 2).astype(np.int32),
                   (batch, 1))
  return dict(image=rng.uniform(-1, 1, (batch, 64, 64, 3)).astype(np.float32),
              text=rng.integers(3, 259, (batch, length), dtype=np.int32),
              mask_ar=suffix, mask_loss=suffix,
              mask_input=np.ones((batch, length), np.int32),
              task_id=rng.integers(0, 2, batch, dtype=np.int32))


def _setup(config, optimizer=None, num_tasks=2, **step_kwargs):
  """(initial state, jitted train step, put_batch) for `config`."""
  optimizer = optimizer or optim.make_optimizer(config.train)
  mesh = partitioning.make_mesh(dict(config.mesh))
  init_fn, _, parts = trainer.create_state(config, mesh, optimizer)
  step = jax.jit(trainer.make_train_step(
      parts, optimizer, optim.learning_rate_schedule(config.train),
      num_tasks=num_tasks, **step_kwargs))
  put = host_shards.make_put_batch(mesh, partitioning.config_rules(config))
  return init_fn(jax.random.key(0)), step, put


@pytest.fixture(scope="module")
def default_setup():
  """_setup of the default config, shared: each compile costs seconds."""
  return _setup(tiny_config())


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_microbatches_match_the_full_batch():
  # Plain SGD with lr 1: the parameter change is exactly minus the gradient.
  config = tiny_config()
  state, full, put = _setup(config, optax.sgd(1.0))
  _, micro, _ = _setup(config, optax.sgd(1.0), microbatches=4)
  batch = put(_batch())
  checks.assert_steps_match(micro(state, batch), full(state, batch),
                            rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_masters(default_setup):
  state, f32_step, put = default_setup
  _, bf16_step, _ = _setup(tiny_config(), compute_dtype=jnp.bfloat16)
  batch = put(_batch())
  assert "bf16" in bf16_step.lower(state, batch).as_text()
  after, metrics = bf16_step(state, batch)
  _, reference = f32_step(state, batch)
  assert metrics["loss"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=2e-2)
  for leaf in jax.tree.leaves((after.params, after.frozen)):
    assert leaf.dtype == jnp.float32
  for leaf in jax.tree.leaves(after.opt_state):
    assert leaf.dtype in (jnp.float32, jnp.int32)


def test_lr_multipliers_scale_each_group(default_setup):
  scaled = tiny_config(lr_multipliers=[(r"decoder/.*", 0.5), (r"vit/.*", 0.)])
  delta = lambda old, new: jax.tree.map(jnp.subtract, new.params, old.params)
  base_delta, scaled_delta = [
      delta(state, step(state, put(_batch()))[0])
      for state, step, put in (default_setup, _setup(scaled))]
  np.testing.assert_allclose(
      scaled_delta["decoder"]["embedder"]["embedding"],
      0.5 * base_delta["decoder"]["embedder"]["embedding"], atol=1e-7)
  for leaf in jax.tree.leaves(scaled_delta["vit"]):
    np.testing.assert_array_equal(leaf, 0)
  _assert_trees_equal(scaled_delta["connector"], base_delta["connector"])

  typo = tiny_config(lr_multipliers=[(r"decodr/.*", 0.5)])
  with pytest.raises(ValueError, match="decodr.*matches no trained"):
    _setup(typo)


def test_nonfinite_batch_or_update_changes_nothing_but_the_step(
    default_setup):
  state, step, put = default_setup
  batch = _batch()
  batch["image"][0, 0, 0, 0] = np.nan
  after, metrics = step(state, put(batch))
  assert int(metrics["nonfinite"]) == 1 and int(after.step) == 1
  _assert_trees_equal(after.params, state.params)
  _assert_trees_equal(after.opt_state, state.opt_state)

  # A finite loss whose update overflows is refused as well.
  state, step, put = _setup(tiny_config(lr=float("inf")))
  after, metrics = step(state, put(_batch()))
  assert np.isfinite(metrics["loss"]) and int(metrics["nonfinite"]) == 1
  _assert_trees_equal(after.params, state.params)


def test_training_stops_after_consecutive_nonfinite_steps(synthetic_data_dir,
                                                          tmp_path):
  config = tiny_config(synthetic_data_dir, steps=10, lr=float("inf"),
                       checkpoint_every=1, max_nonfinite_steps=3)
  with pytest.raises(guards.NonFiniteError, match="Steps 1-3.*3 times"):
    trainer.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "train_metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  assert [r["skipped_steps"] for r in logged[:3]] == [1, 1, 1]
  # What was checkpointed is the finite initial state.
  mesh = partitioning.make_mesh(dict(config.mesh))
  init_fn, abstract, _ = trainer.create_state(
      config, mesh, optim.make_optimizer(config.train))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", keep=3)
  step, restored, _, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step >= 3
  _assert_trees_equal(restored.params, init_fn(jax.random.key(0)).params)


def test_the_finiteness_check_is_compiled_once_not_per_parameter():
  # XLA used to fuse the whole check into each parameter's select, so the
  # step's HLO grew with the square of the parameter arrays (minutes of
  # compilation for SMoLA's many small arrays on CPU: 15,588 is-finite ops
  # for the `tiny` preset with 3 pools).
  config = tiny_config()
  config.experts = [dict(kind="smola", targets=r"decoder/.*/mlp/(gate|up)",
                         pools=dict(text=1, image=1, all=1), rank=2)]
  state, step, put = _setup(config)
  hlo = step.lower(state, put(_batch())).compile().as_text()
  # The loss, each gradient and each new parameter, about once.
  checked = 1 + 2 * len(jax.tree.leaves(state.params))
  assert hlo.count("is-finite(") <= 1.25 * checked
