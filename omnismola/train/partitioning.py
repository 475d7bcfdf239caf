"""Device mesh and logical-to-mesh sharding rules, as data from the config.

A rule list maps logical axis names (`logical_axes` metadata) to mesh axes;
for a name listed several times, the first candidate that exists in the
mesh with size > 1, divides the dimension and is not yet used by another
dimension wins (MaxText's ordered fallbacks). Unmatched is replicated.
"""
import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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


def config_rules(config) -> list[tuple]:
  """config.sharding_rules as (logical axis, mesh axes) tuples, the form
  every function here takes."""
  return [tuple(rule) for rule in config.sharding_rules]


def make_mesh(axis_sizes: dict, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, expert), possibly over slices.

  `axis_sizes` is `config.mesh`: per slice, and across slices in its `dcn`
  entry (docs/training.md, "Multi-slice meshes"). Devices without a
  `slice_index` (CPU, GPU) are laid out by `hybrid_layout`.
  """
  devices = list(jax.devices() if devices is None else devices)
  axis_sizes = dict(axis_sizes)
  dcn = _dcn_sizes(dict(axis_sizes.pop("dcn", None) or {}))
  unknown = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}; mesh axes are "
                     f"{MESH_AXES} (and `dcn`, their sizes across slices).")
  num_slices = int(np.prod(dcn))
  if len(devices) % num_slices:
    raise ValueError(f"config.mesh.dcn={dict(zip(MESH_AXES, dcn))} asks "
                     f"for {num_slices} slices; {len(devices)} devices do "
                     "not split into that many equal slices.")
  ici = _resolve_sizes(axis_sizes, len(devices) // num_slices, num_slices)
  if num_slices > 1 and hasattr(devices[0], "slice_index"):
    found = len({d.slice_index for d in devices})
    if found != num_slices:
      raise ValueError(f"config.mesh.dcn={dict(zip(MESH_AXES, dcn))} asks "
                       f"for {num_slices} slices; the devices are on "
                       f"{found}.")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    grid = hybrid_layout(devices, ici, dcn)
  return Mesh(grid, MESH_AXES)


def _dcn_sizes(dcn: dict) -> list[int]:
  """Sizes of every mesh axis across slices from `config.mesh.dcn`."""
  unknown = sorted(set(dcn) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown axes {unknown} in config.mesh.dcn; mesh axes "
                     f"are {MESH_AXES}.")
  sizes = [int(dcn.get(name, 1)) for name in MESH_AXES]
  if min(sizes) < 1:
    raise ValueError(f"config.mesh.dcn sizes must be >= 1 (no -1: the "
                     f"number of slices is fixed), got {dcn}.")
  return sizes


def _resolve_sizes(axis_sizes: dict, devices_per_slice: int,
                   num_slices: int) -> list[int]:
  """Per-slice sizes of every mesh axis, -1 resolved."""
  per = " per slice" if num_slices > 1 else ""
  sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {axis_sizes}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if devices_per_slice % known:
      raise ValueError(f"Mesh {axis_sizes}: {devices_per_slice} devices"
                       f"{per} are not divisible by the fixed axes' product "
                       f"{known}.")
    sizes[sizes.index(-1)] = devices_per_slice // known
  if int(np.prod(sizes)) != devices_per_slice:
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{int(np.prod(sizes))} devices{per}, found "
                     f"{devices_per_slice}" +
                     (f" ({num_slices} slices from config.mesh.dcn)."
                      if num_slices > 1 else "."))
  return sizes


def hybrid_layout(devices: Sequence[Any], ici: Sequence[int],
                  dcn: Sequence[int]) -> np.ndarray:
  """Devices in create_hybrid_device_mesh's layout, slices = device runs.

  Along axis i, mesh index `dcn_i * ici[i] + ici_i` is position `ici_i`
  within slice coordinate `dcn_i`: an axis's ICI neighbours share a slice
  and only the dcn steps cross slices.
  """
  n = len(ici)
  grid = np.asarray(devices, dtype=object).reshape(tuple(dcn) + tuple(ici))
  # (dcn_0, ..., dcn_n-1, ici_0, ..., ici_n-1) -> (dcn_0, ici_0, dcn_1, ...).
  order = [axis for i in range(n) for axis in (i, n + i)]
  return grid.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])


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
      axes = tuple(a for a in _as_axes(target) if mesh.shape.get(a, 1) > 1)
      size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if axes and not used & set(axes) and dim % size == 0:
        chosen = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
      if not _as_axes(target):  # An explicit None: replicate, stop looking.
        break
    spec.append(chosen)
  return PartitionSpec(*spec)


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  """A variable's `logical_axes` metadata; all None where it has none."""
  return tuple(variable.get_metadata().get("logical_axes") or
               (None,) * len(variable.shape))


def state_shardings(state: nnx.State, rules, mesh: Mesh) -> dict:
  """NamedShardings (as a pure dict) for every variable of an NNX state."""
  shardings = jax.tree.map(
      lambda v: NamedSharding(mesh, logical_to_spec(_logical_axes(v),
                                                    v.shape, rules, mesh)),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 follows the `batch` rules."""
  return activation_sharding(mesh, rules)(
      ("batch",) + (None,) * (len(shape) - 1), shape)


def activation_sharding(mesh: Mesh, rules) -> Callable:
  """(logical axes, shape) -> NamedSharding, for models.layers.constrain."""
  rules = list(rules)
  return lambda axes, shape: NamedSharding(
      mesh, logical_to_spec(axes, shape, rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def process_local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, as numpy: the inverse of
  `jax.make_array_from_process_local_data` along dim 0."""
  blocks = {shard.index[0].start or 0: shard.data
            for shard in array.addressable_shards}
  return np.concatenate([np.asarray(blocks[start])
                         for start in sorted(blocks)])


@dataclasses.dataclass(frozen=True)
class Parameter:
  """One parameter's layout, as the replication check sees it."""
  path: str
  shape: tuple[int, ...]
  logical_axes: tuple[str | None, ...]
  nbytes: int
  spec: PartitionSpec

  @property
  def replicated(self) -> bool:
    return not any(self.spec)


def parameter_layouts(states: Sequence[nnx.State], rules,
                      mesh: Mesh) -> list[Parameter]:
  """Every variable of `states` (abstract or real) with its PartitionSpec."""
  out = []
  for state in states:
    for path, variable in nnx.to_flat_state(state):
      shape, axes = tuple(variable.shape), _logical_axes(variable)
      out.append(Parameter(
          path="/".join(str(k) for k in path), shape=shape, logical_axes=axes,
          nbytes=int(np.prod(shape)) * np.dtype(variable.dtype).itemsize,
          spec=logical_to_spec(axes, shape, rules, mesh)))
  return out


def check_replication(parameters: Sequence[Parameter], mesh: Mesh,
                      max_fraction: float, *, show: int = 5) -> float:
  """Share of parameter bytes that every device holds whole; an error
  naming the largest such parameters if above `max_fraction`."""
  total = sum(p.nbytes for p in parameters)
  # On a one-device mesh nothing is replicated *across* devices.
  fraction = (0.0 if mesh.size == 1 or not total else
              sum(p.nbytes for p in parameters if p.replicated) / total)
  if fraction <= max_fraction:
    return fraction
  largest = sorted((p for p in parameters if p.replicated),
                   key=lambda p: -p.nbytes)[:show]
  lines = [f"  {p.path} {list(p.shape)} {p.logical_axes} "
           f"{p.nbytes / 2**20:,.1f} MiB; could shard: "
           f"{_shardable(p, mesh) or 'no dimension divides a mesh axis'}"
           for p in largest]
  raise ValueError(
      f"{fraction:.1%} of the parameter bytes ({fraction * total / 2**30:.2f}"
      f" of {total / 2**30:.2f} GiB) are replicated whole on each of the "
      f"{mesh.size} devices of mesh {dict(mesh.shape)}, above "
      f"config.train.max_replicated_fraction={max_fraction}. Largest:\n" +
      "\n".join(lines) +
      "\nShard them: add config.sharding_rules entries mapping one of their "
      "logical axes to a mesh axis of size > 1 that divides it (e.g. "
      "('embed', 'fsdp') with --config.mesh.fsdp > 1, the default rules' "
      "ZeRO-3 layout), or raise config.train.max_replicated_fraction "
      "(1.0 turns the check off).")


def _shardable(parameter: Parameter, mesh: Mesh) -> str:
  """'name (dim) over axis|axis, ...': mesh axes dividing each dimension."""
  options = []
  for name, dim in zip(parameter.logical_axes, parameter.shape):
    axes = [a for a, n in mesh.shape.items() if n > 1 and dim % n == 0]
    if name and axes:
      options.append(f"{name} ({dim}) over {'|'.join(axes)}")
  return ", ".join(options)
