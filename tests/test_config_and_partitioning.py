"""Config loading, override checks, mesh construction and sharding rules."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from omnismola import config_lib
from omnismola.train import partitioning

MIX = "configs/mix.py"


def test_mix_config_loads_with_shared_field_names():
  c = config_lib.load_config_file(MIX)
  for field in ("seed", "model", "experts", "mesh", "sharding_rules", "data",
                "train", "eval", "init"):
    assert field in c
  for field in ("steps", "batch_size", "lr", "trainable", "log_every",
                "checkpoint_every", "keep_checkpoints"):
    assert field in c.train
  assert {"mixture", "task_modules", "feature_lengths"} <= set(c.data)
  assert "every" in c.eval and "tasks" in c.eval
  assert c.experts[0]["kind"] == "smola"
  assert set(c.experts[0]["pools"]) == {"text", "image", "all"}


def test_config_arguments_are_typed_and_checked():
  c = config_lib.load_config_file(MIX + ":experts_per_pool=16,rank=2")
  assert c.experts[0]["pools"] == dict(text=16, image=16, all=16)
  assert c.experts[0]["rank"] == 2
  with pytest.raises(config_lib.ConfigKeyError, match="known: .*rank"):
    config_lib.load_config_file(MIX + ":rnak=2")


def test_misspelt_override_names_the_key_and_the_valid_ones():
  c = config_lib.load_config_file(MIX)
  config_lib.check_override_keys(c, ["--config.train.steps=5"])
  with pytest.raises(config_lib.ConfigKeyError) as e:
    config_lib.check_override_keys(c, ["--config.train.stpes=5"])
  assert "'stpes'" in str(e.value) and "config.train" in str(e.value)
  assert "steps" in str(e.value)


def test_mesh_sizes_and_errors():
  mesh = partitioning.make_mesh(dict(data=-1, tensor=2))
  assert dict(mesh.shape) == dict(data=4, fsdp=1, tensor=2, expert=1)
  with pytest.raises(ValueError, match="needs 16 devices"):
    partitioning.make_mesh(dict(data=8, tensor=2))
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    partitioning.make_mesh(dict(model=8))


def test_logical_rules_use_ordered_fallbacks():
  mesh = partitioning.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = partitioning.DEFAULT_RULES
  assert partitioning.logical_to_spec(("embed", "mlp"), (8, 16), rules,
                                      mesh) == P("fsdp", "tensor")
  # Batch takes data x fsdp when divisible, else falls back to data alone.
  assert partitioning.logical_to_spec(("batch",), (8,), rules,
                                      mesh) == P(("data", "fsdp"))
  assert partitioning.logical_to_spec(("batch",), (6,), rules,
                                      mesh) == P("data")
  # Indivisible dimensions and unsharded names stay whole.
  assert partitioning.logical_to_spec(("embed", "lora_rank"), (7, 4), rules,
                                      mesh) == P(None, None)
  # An axis is used at most once per array.
  assert partitioning.logical_to_spec(("mlp", "heads"), (4, 4), rules,
                                      mesh) == P("tensor", None)


def test_size_one_axes_are_not_used():
  mesh = partitioning.make_mesh(dict(data=-1))
  assert partitioning.logical_to_spec(("embed", "mlp"), (8, 8),
                                      partitioning.DEFAULT_RULES,
                                      mesh) == P(None, None)
  assert len(jax.devices()) == 8 and np.prod(list(mesh.shape.values())) == 8
