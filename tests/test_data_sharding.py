"""Host shards from the mesh, global batch assembly, every host's input state
in checkpoints, the over-length counts in the training log, and the input
throughput benchmark.

Run as a script (`python tests/test_data_sharding.py PORT PROCESS_ID`) this
file is one of two JAX processes (4 CPU devices each) that assemble global
batches from their shards and check what every device received.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from omnismola import config_lib
from omnismola.train import checkpoint as checkpoint_lib
from omnismola.train import host_shards
from omnismola.train import partitioning
from omnismola.train import trainer

RULES = partitioning.DEFAULT_RULES
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16

# 8 devices; a pretend process owns devices 4p..4p+3 unless a layout says.
TWO_HOSTS = lambda device: device.id // 4
FOUR_HOSTS = lambda device: device.id // 2
SPREAD = [0, 4, 1, 5, 2, 6, 3, 7]  # Neighbouring mesh positions on 2 hosts.

LAYOUTS = {
    # Pure data parallelism: each host its own half of the batch.
    "data=8": (dict(data=8), range(8), TWO_HOSTS, [(0, 2), (1, 2)]),
    # Batch over data (and fsdp); tensor groups stay within a host.
    "data=2,tensor=4": (dict(data=2, tensor=4), range(8), TWO_HOSTS,
                        [(0, 2), (1, 2)]),
    "fsdp=2,tensor=4": (dict(fsdp=2, tensor=4), range(8), TWO_HOSTS,
                        [(0, 2), (1, 2)]),
    # A tensor group spans two hosts: both read the same shard; two
    # data-parallel groups span hosts, so two shards.
    "4 hosts, data=2,tensor=4": (dict(data=2, tensor=4), range(8),
                                 FOUR_HOSTS, [(0, 2), (0, 2), (1, 2),
                                              (1, 2)]),
    # Every data-parallel group spans both hosts: one shard, read by both.
    "data=4,tensor=2 across hosts": (dict(data=4, tensor=2), SPREAD,
                                     TWO_HOSTS, [(0, 1), (0, 1)]),
    # The batch is not sharded at all.
    "tensor=8": (dict(tensor=8), range(8), TWO_HOSTS, [(0, 1), (0, 1)]),
    # Each host's rows are every other block: still two disjoint shards.
    "data=8 interleaved": (dict(data=8), SPREAD, TWO_HOSTS,
                           [(0, 2), (1, 2)]),
}


def _rows(mesh_sizes, order, process_of):
  mesh = partitioning.make_mesh(mesh_sizes, [jax.devices()[i] for i in order])
  sharding = partitioning.batch_sharding(mesh, RULES, (BATCH,))
  return host_shards.rows_by_process(sharding, BATCH, process_of)


@pytest.mark.parametrize("name", LAYOUTS)
def test_host_shards_of_fake_layouts(name):
  mesh_sizes, order, process_of, expected = LAYOUTS[name]
  rows = _rows(mesh_sizes, order, process_of)
  shards = host_shards.shards_from_rows(rows)
  assert [(shards[p].index, shards[p].count) for p in sorted(shards)] == (
      expected)
  # A shard is exactly what its processes' devices hold, and the shards
  # partition the global batch into equal per-host batches.
  count = expected[0][1]
  by_shard = {shards[p].index: rows[p] for p in rows}
  assert sorted(len(r) for r in by_shard.values()) == [BATCH // count] * count
  assert sorted(set().union(*by_shard.values())) == list(range(BATCH))


def test_interleaved_rows_and_an_impossible_layout():
  rows = _rows(dict(data=8), SPREAD, TWO_HOSTS)
  assert sorted(rows[0]) == [0, 1, 4, 5, 8, 9, 12, 13]
  # Process 1 holds devices 3-5: half of each data-parallel group.
  three_hosts = lambda device: {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}.get(
      device.id, 2)
  with pytest.raises(ValueError, match="overlapping but different"):
    host_shards.shards_from_rows(_rows(dict(data=2, tensor=4), range(8),
                                       three_hosts))


def test_put_batch_checks_the_shard_against_the_mesh():
  mesh = partitioning.make_mesh(dict(data=8))
  shard = host_shards.host_shard(mesh, RULES, BATCH)
  assert shard == host_shards.HostShard(0, 1)  # One process: everything.
  local = np.arange(BATCH * 3, dtype=np.int32).reshape(BATCH, 3)
  placed = host_shards.make_put_batch(mesh, RULES, shard)({"x": local})["x"]
  np.testing.assert_array_equal(np.asarray(placed), local)
  assert placed.sharding.spec == jax.sharding.PartitionSpec("data", None)
  with pytest.raises(ValueError, match="read as shard"):
    host_shards.make_put_batch(mesh, RULES, host_shards.HostShard(0, 2))(
        {"x": local})


def test_checkpoint_keeps_every_process_input_state(tmp_path):
  state = {"w": jax.numpy.arange(4.0)}
  abstract = checkpoint_lib.abstract_with_shardings(
      state, {"w": partitioning.replicated(partitioning.make_mesh(
          dict(data=8)))})
  mine = {"batches_consumed": 5, "shard": [0, 1], "over_length": [2, 0]}
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=1)
  ckpt.save(5, state, mine, {})
  ckpt.wait()
  saved = ckpt.manager.restore(5, args=ocp.args.Composite(
      data=ocp.args.JsonRestore())).data
  assert saved == {"processes": [mine]}
  assert ckpt.restore_latest(abstract).data == mine
  ckpt.close()
  # A run with more processes than the saving one: the extra ones resume
  # from process 0's position (the pipeline warns that their shard differs).
  other = dict(mine, shard=[1, 2])
  two = {"processes": [dict(mine, shard=[0, 2]), other]}
  assert checkpoint_lib.state_of_process(two, 1) == other
  assert checkpoint_lib.state_of_process(two, 2) == two["processes"][0]


def _data_metrics(workdir) -> dict[int, dict]:
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("data/")}
            for r in map(json.loads, f)}


def test_over_length_counts_reach_the_log(synthetic_data_dir, tmp_path):
  """Counted per step, cumulative; their resume is test_data_pipeline's."""
  from omnismola.data import pipeline  # pylint: disable=g-import-not-at-top
  from test_trainer import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(synthetic_data_dir, steps=3)
  config.data.feature_lengths.suffix = 6  # Every caption is longer.
  trainer.train_and_evaluate(config, str(tmp_path))

  it = pipeline.make_train_iterator(config.data, global_batch_size=8,
                                    seed=config.seed)
  expected = {}
  for step in range(1, 4):
    next(it)
    expected[step] = pipeline.over_length_metrics(config.data,
                                                  [it.get_state()])
  assert _data_metrics(tmp_path) == expected
  assert expected[3]["data/synthetic_captioning/truncated"] > 0


def test_input_benchmark_measures_the_train_iterator(synthetic_data_dir):
  # Not at the top: run as a script, this file cannot import `benchmarks`.
  from benchmarks import input as bench  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file("configs/mix.py")
  config.data.tfds_data_dir = str(synthetic_data_dir)
  config.data.shuffle_buffer = 64
  config.train.batch_size = 8
  result = bench.measure(config, batches=3, warmup=1, threads=1)
  assert result["examples"] == 24 and result["examples_per_s"] > 0
  # Image tokens are never padding, so the whole sequence is fuller.
  assert 0 < result["text_fill"] < result["sequence_fill"] < 1
  assert result["examples_per_row"] == 1

  config.data.packing.examples = 3
  packed = bench.measure(config, batches=3, warmup=1, threads=1)
  assert 1 < packed["examples_per_row"] <= 3
  assert packed["examples"] == round(24 * packed["examples_per_row"])
  assert result["text_fill"] < packed["text_fill"] <= 1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_assemble_global_batches_from_their_shards():
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workers = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(port), str(i)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  for worker in workers:
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert "shards (0, 2) (1, 2); shared (0, 1)" in output, output


def _worker(port: str, process_id: str) -> None:
  """One of the two processes (see the module docstring)."""
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  hosts = [[d for d in jax.devices() if d.process_index == p]
           for p in range(2)]
  layouts = {"own": (dict(data=8), hosts[0] + hosts[1]),
             # Every data-parallel pair spans both processes.
             "shared": (dict(data=4, tensor=2),
                        [d for pair in zip(*hosts) for d in pair])}
  seen = {}
  for name, (sizes, devices) in layouts.items():
    mesh = partitioning.make_mesh(sizes, devices)
    shard = host_shards.host_shard(mesh, RULES, BATCH)
    seen[name] = (shard.index, shard.count)
    # Every process reads its shard's rows: 100 * shard + position.
    local = 100 * shard.index + np.arange(BATCH // shard.count)
    placed = host_shards.make_put_batch(mesh, RULES, shard)({"x": local})["x"]
    rows = host_shards.rows_by_process(
        placed.sharding, BATCH, lambda device: device.process_index)
    shards = host_shards.shards_from_rows(rows)
    expected = np.zeros(BATCH, int)
    for process, row_set in rows.items():
      expected[sorted(row_set)] = (100 * shards[process].index +
                                   np.arange(len(row_set)))
    for piece in placed.addressable_shards:
      np.testing.assert_array_equal(piece.data, expected[piece.index])
  gathered = checkpoint_lib.all_process_states(seen["own"])
  print(f"shards {tuple(gathered[0])} {tuple(gathered[1])}; shared "
        f"{seen['shared']}")


if __name__ == "__main__":
  _worker(*sys.argv[1:])
