"""Which shard of the training data each process reads, from the mesh, and
the global batch assembled from the shards (`make_put_batch`).

A process feeds exactly the batch rows its devices hold, so processes whose
devices hold the same rows read the same shard (docs/data.md, "Hosts and
shards"). The shards are a pure function of the sharding and of a device ->
process function, so layouts of many hosts can be checked on one machine.
"""
import dataclasses
import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

from omnismola.train import partitioning


@dataclasses.dataclass(frozen=True)
class HostShard:
  """This process reads shard `index` of `count`: B / count rows, which fill
  its devices' rows of the global batch in increasing order."""
  index: int
  count: int


def rows_by_process(sharding: Sharding, num_rows: int,
                    process_of: Callable[[jax.Device], int]
                    ) -> dict[int, frozenset[int]]:
  """{process: the global batch rows its devices hold} for a batch sharding."""
  rows: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((num_rows,)).items():
    rows.setdefault(process_of(device), set()).update(
        range(*index[0].indices(num_rows)))
  return {process: frozenset(r) for process, r in rows.items()}


def shards_from_rows(rows: dict[int, frozenset[int]]) -> dict[int, HostShard]:
  """{process: HostShard}: one shard per distinct row set, numbered by the
  set's first row; an error where no per-host batch of one shape could
  feed them (overlapping but different rows, or sets of unequal sizes)."""
  distinct = sorted(set(rows.values()), key=min)
  sizes = {len(s) for s in distinct}
  if (len(frozenset().union(*distinct)) != sum(len(s) for s in distinct)
      or len(sizes) != 1):
    described = {p: f"{len(r)} rows from {min(r)}" for p, r in
                 sorted(rows.items())}
    raise ValueError(
        "The mesh gives processes overlapping but different (or unequal) "
        f"sets of batch rows ({described}), so no process-local batch can "
        "feed them. Lay the mesh out so that every data-parallel group lies "
        "within one process or spans whole processes (config.mesh and the "
        "'batch' entries of config.sharding_rules).")
  number = {row_set: i for i, row_set in enumerate(distinct)}
  return {process: HostShard(number[r], len(distinct))
          for process, r in rows.items()}


def host_shard(mesh: Mesh, rules, global_batch_size: int) -> HostShard:
  """The shard this process reads of a global batch of that size."""
  sharding = partitioning.batch_sharding(mesh, rules, (global_batch_size,))
  shards = shards_from_rows(rows_by_process(
      sharding, global_batch_size, lambda device: device.process_index))
  return shards[jax.process_index()]


def make_put_batch(mesh: Mesh, rules, shard: HostShard | None = None
                   ) -> Callable[[dict], dict]:
  """Host-local numpy batch (shard `shard`, by default every process its
  own) -> global arrays sharded over the batch axes; a mesh that lays the
  rows out otherwise is an error rather than a mis-assembled batch."""
  shard = shard or HostShard(jax.process_index(), jax.process_count())

  @functools.cache  # Once per batch size.
  def check(global_rows: int) -> None:
    laid_out = host_shard(mesh, rules, global_rows)
    if laid_out != shard:
      raise ValueError(
          f"A global batch of {global_rows} rows puts shard {laid_out} on "
          f"this process, but its input was read as shard {shard}; read it "
          "with host_shards.host_shard(mesh, rules, batch size).")

  def put(batch: dict) -> dict:
    out = {}
    for key, local in batch.items():
      if not isinstance(local, np.ndarray):
        continue  # e.g. reference strings stay on the host.
      global_shape = (local.shape[0] * shard.count,) + local.shape[1:]
      check(global_shape[0])
      sharding = partitioning.batch_sharding(mesh, rules, global_shape)
      out[key] = jax.make_array_from_process_local_data(sharding, local,
                                                        global_shape)
    return out

  return put
