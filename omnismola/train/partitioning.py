"""Device mesh and logical-to-mesh sharding rules, as data from the config.

Every parameter carries logical axis names (`logical_axes` metadata, e.g.
("embed", "mlp")). A rule list maps each name to mesh axes; a name may appear
several times, and the first candidate that exists in the mesh with size > 1,
divides the dimension and is not yet used by another dimension wins (MaxText's
ordered fallbacks). Anything unmatched is replicated.
"""
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Defaults: data parallel over data+fsdp, ZeRO-3-style parameter sharding over
# fsdp, Megatron-style over tensor, experts over expert. Low-rank axes stay
# whole: they are tiny and sharding them only adds collectives.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("lora_rank", None),
    ("patch", None),
    ("vision_patches", None),
)


def make_mesh(axis_sizes: dict[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, expert); one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}; mesh axes are "
                     f"{MESH_AXES}.")
  sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {axis_sizes}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"Mesh {axis_sizes}: {len(devices)} devices are not "
                       f"divisible by the fixed axes' product {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{int(np.prod(sizes))} devices, found {len(devices)}.")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _as_axes(target) -> tuple[str, ...]:
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    rules: Iterable[tuple[str, Any]],
                    mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for one array from its logical axis names."""
  rules = list(rules)
  if len(logical_axes) != len(shape):
    raise ValueError(f"Logical axes {tuple(logical_axes)} do not match an "
                     f"array of shape {tuple(shape)}.")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    chosen = None
    for rule_name, target in rules:
      if name is None or rule_name != name:
        continue
      axes = tuple(a for a in _as_axes(target)
                   if a in mesh.shape and mesh.shape[a] > 1)
      size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if axes and not used & set(axes) and dim % size == 0:
        chosen = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
      if not _as_axes(target):  # An explicit None: replicate, stop looking.
        break
    spec.append(chosen)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, rules, mesh: Mesh) -> dict:
  """NamedShardings (as a pure dict) for every variable of an NNX state."""
  def one(variable):
    axes = variable.get_metadata().get("logical_axes")
    shape = variable.shape
    if axes is None:
      axes = (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, rules, mesh))

  shardings = jax.tree.map(one, state,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 follows the `batch` rules."""
  spec = logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape,
                         rules, mesh)
  return NamedSharding(mesh, spec)


def activation_sharding(mesh: Mesh, rules) -> Callable:
  """(logical axes, shape) -> NamedSharding, for models.layers.constrain."""
  rules = list(rules)
  return lambda axes, shape: NamedSharding(
      mesh, logical_to_spec(axes, shape, rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
