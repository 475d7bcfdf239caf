"""Sparse experts in the trainer: auxiliary losses, routing stats, upcycling."""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from omnismola.train import init as init_lib
from omnismola.train import optim
from omnismola.train import partitioning
from omnismola.train import trainer
from test_trainer import tiny_config

MOE = [
    dict(kind="sparse_moe", targets=r"vit/layers/\d+/mlp", num_experts=4,
         top_k=2, dispatch="capacity", capacity_factor=1.0),
    dict(kind="sparse_moe", targets=r"decoder/layers/\d+/mlp", num_experts=4,
         top_k=2),
]


def _moe_config(data_dir, **train):
  c = tiny_config(data_dir, **train)
  c.experts = MOE
  return c


@pytest.fixture(scope="module")
def dense(synthetic_data_dir, tmp_path_factory):
  """The workdir of a finished 2-step dense run (checkpoint of step 2),
  which both upcycling tests start from (neither writes into it)."""
  workdir = tmp_path_factory.mktemp("dense")
  trainer.train_and_evaluate(tiny_config(synthetic_data_dir, steps=2),
                             str(workdir))
  return workdir


def test_aux_losses_and_routing_stats_are_logged(synthetic_data_dir,
                                                 tmp_path):
  c = _moe_config(synthetic_data_dir, steps=2)
  trainer.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / "train_metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  row = rows[-1]
  for block in ("vit/layers/mlp", "decoder/layers/mlp"):
    for stat in ("balance_loss", "z_loss", "max_violation", "router_entropy",
                 "dropped_fraction"):
      assert np.isfinite(row[f"moe/{block}/{stat}"]), (block, stat)
  # Balance loss is >= 1 (1 at perfect balance): the weighted sum is real.
  weights = dict(c.train.aux_loss_weights)
  want = sum(weights["balance_loss"] * row[f"moe/{b}/balance_loss"] +
             weights["z_loss"] * row[f"moe/{b}/z_loss"]
             for b in ("vit/layers/mlp", "decoder/layers/mlp"))
  np.testing.assert_allclose(row["aux_loss"], want, rtol=1e-4)
  assert row["aux_loss"] >= 0.02 * 0.99


def test_moe_model_upcycles_from_a_dense_run(synthetic_data_dir, dense,
                                            tmp_path):
  """Stage 2 of CuMo: a dense checkpoint initialises an MoE model whose
  experts are copies of the dense MLPs (the routers start fresh)."""
  c = _moe_config(synthetic_data_dir, steps=1)
  c.init.checkpoint = str(dense)
  mesh = partitioning.make_mesh(dict(c.mesh))
  init_fn, abstract, _ = trainer.create_state(
      c, mesh, optim.make_optimizer(c.train))
  state = init_lib.load_partial(str(dense), init_fn(jax.random.key(0)),
                                abstract)
  saved = ocp.StandardCheckpointer().restore(
      str(dense / "checkpoints" / "2" / "state"))["params"]
  for tower, names in (("vit", ("fc1", "fc2")),
                       ("decoder", ("gate", "up", "down"))):
    moe = state.params[tower]["layers"]["mlp"]
    for name in names:
      experts = np.asarray(moe["layers"][name]["kernel"])  # [depth, E, ...]
      parent = np.asarray(saved[tower]["layers"]["mlp"][name]["kernel"])
      assert experts.shape[1] == 4
      for e in range(4):
        np.testing.assert_array_equal(experts[:, e], parent)
  # The step runs from there.
  trainer.train_and_evaluate(c, str(tmp_path / "moe"))


def test_upcycle_false_keeps_fresh_experts_and_loads_the_rest(
    synthetic_data_dir, dense):
  """init.upcycle=False (CuMo's from-scratch ablation): the MoE experts keep
  their fresh initialisation; every parameter the dense run has loads."""
  saved = init_lib.flatten_by_path(
      ocp.StandardCheckpointer().restore(
          str(dense / "checkpoints" / "2" / "state"))["params"])
  c = _moe_config(synthetic_data_dir, steps=1)
  mesh = partitioning.make_mesh(dict(c.mesh))
  init_fn, abstract, _ = trainer.create_state(
      c, mesh, optim.make_optimizer(c.train))
  fresh = init_fn(jax.random.key(0))
  flat = lambda state: init_lib.flatten_by_path(state.params)
  loaded = {}
  for upcycle in (True, False):
    c.init.upcycle = upcycle
    loaded[upcycle] = flat(init_lib.load_partial(
        str(dense), fresh, abstract, upcycle=c.init.upcycle))
  for tower, names in (("vit", ("fc1", "fc2")),
                       ("decoder", ("gate", "up", "down"))):
    for name in names:
      parent = np.asarray(saved[f"{tower}/layers/mlp/{name}/kernel"])
      expert = f"{tower}/layers/mlp/layers/{name}/kernel"  # [depth, E, ...]
      for e in range(4):
        np.testing.assert_array_equal(loaded[True][expert][:, e], parent)
        assert np.abs(loaded[False][expert][:, e] - parent).max() > 1e-3
      np.testing.assert_array_equal(loaded[False][expert],
                                    flat(fresh)[expert])
  backbone = [k for k in loaded[False] if k in saved]
  assert "decoder/layers/attn/q/kernel" in backbone
  assert "vit/embedding/kernel" in backbone
  for key in backbone:
    np.testing.assert_array_equal(loaded[False][key], saved[key])
  assert set(loaded[False]) - set(backbone) == {
      k for k in loaded[False] if "/mlp/layers/" in k or "/mlp/router" in k}
