"""Pod-scale layout on 8 CPU devices: multi-slice meshes, replication check."""
import types

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from omnismola.train import optim
from omnismola.train import partitioning
from omnismola.train import trainer
from test_trainer import tiny_config


def _ids(grid) -> np.ndarray:
  return np.vectorize(lambda d: d.id)(grid)


def test_dcn_sizes_multiply_the_slice_sizes():
  mesh = partitioning.make_mesh(dict(data=4, dcn=dict(data=2)))
  assert dict(mesh.shape) == dict(data=8, fsdp=1, tensor=1, expert=1)
  # -1 is the rest of one slice's devices: 2 slices of 4, fsdp 2 in each.
  mesh = partitioning.make_mesh(dict(data=-1, fsdp=2, dcn=dict(data=2)))
  assert dict(mesh.shape) == dict(data=4, fsdp=2, tensor=1, expert=1)
  # Slice 0 (devices 0-3) holds data rows 0-1, slice 1 rows 2-3; the fsdp
  # axis never leaves a slice.
  np.testing.assert_array_equal(_ids(mesh.devices)[..., 0, 0],
                                [[0, 1], [2, 3], [4, 5], [6, 7]])
  mesh = partitioning.make_mesh(dict(data=2, fsdp=2, dcn=dict(fsdp=2)))
  np.testing.assert_array_equal(_ids(mesh.devices)[..., 0, 0],
                                [[0, 1, 4, 5], [2, 3, 6, 7]])


@pytest.mark.parametrize("ici,dcn", [
    ((4, 1, 1, 1), (2, 1, 1, 1)),
    ((2, 2, 1, 1), (2, 1, 1, 1)),
    ((1, 2, 2, 1), (1, 2, 1, 1)),
    ((1, 1, 2, 1), (2, 1, 1, 2)),
])
def test_layout_without_slice_index_matches_the_hybrid_mesh(ici, dcn):
  """Devices without `slice_index` are laid out as create_hybrid_device_mesh
  lays out devices whose slices are the same runs of consecutive devices."""
  per_slice = int(np.prod(ici))
  fake = [types.SimpleNamespace(id=i, slice_index=i // per_slice,
                                platform="cpu", device_kind="cpu")
          for i in range(8)]
  expected = mesh_utils.create_hybrid_device_mesh(ici, dcn, fake)
  got = partitioning.hybrid_layout(fake, ici, dcn)
  np.testing.assert_array_equal(_ids(got), _ids(expected))


def test_inconsistent_dcn_sizes_are_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown axes \['model'\] in "
                     r"config.mesh.dcn"):
    partitioning.make_mesh(dict(data=-1, dcn=dict(model=2)))
  with pytest.raises(ValueError, match="config.mesh.dcn sizes must be >= 1"):
    partitioning.make_mesh(dict(data=-1, dcn=dict(data=-1)))
  with pytest.raises(ValueError, match="asks for 3 slices; 8 devices do not"):
    partitioning.make_mesh(dict(data=-1, dcn=dict(data=3)))
  with pytest.raises(ValueError, match="needs 8 devices per slice, found 4 "
                     r"\(2 slices from config.mesh.dcn\)"):
    partitioning.make_mesh(dict(data=8, dcn=dict(data=2)))


def _built(config, mesh):
  """trainer.setup's result on `mesh` (setup builds config.mesh's)."""
  optimizer = optim.make_optimizer(config.train)
  init_fn, abstract, parts = trainer.create_state(config, mesh, optimizer)
  return trainer.Setup(mesh, partitioning.config_rules(config), optimizer,
                       init_fn, abstract, parts)


def test_replication_check_passes_fsdp_and_names_replicated_parameters():
  config = tiny_config()
  config.train.max_replicated_fraction = 0.01
  # ZeRO-3 by the default rules: only the ViT's few q/k/v/fc1 biases (their
  # one axis maps to `tensor`, size 1 here) stay whole.
  mesh = partitioning.make_mesh(dict(data=1, fsdp=8))
  assert 0 < trainer.check_replication(config, _built(config, mesh)) < 0.01
  # Pure data parallelism holds every byte on every device.
  mesh = partitioning.make_mesh(dict(data=8))
  with pytest.raises(ValueError) as error:
    trainer.check_replication(config, _built(config, mesh))
  message = str(error.value)
  assert "100.0% of the parameter bytes" in message
  assert "max_replicated_fraction=0.01" in message
  # The largest parameter first, with the axes that could shard it.
  assert ("vit/embedding/kernel [768, 32] ('patch', 'embed')" in message and
          "could shard: patch (768) over data, embed (32) over data"
          in message)
  assert "config.sharding_rules" in message
  # One device: nothing is replicated *across* devices.
  mesh = partitioning.make_mesh(dict(data=1), devices=jax.devices()[:1])
  assert trainer.check_replication(config, _built(config, mesh)) == 0
