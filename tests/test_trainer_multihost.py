"""Two processes x 4 CPU devices train, checkpoint and evaluate; one process
restores and evaluates the same checkpoint alike.

Run as a script (`python tests/test_trainer_multihost.py PORT PROCESS_ID
WORKDIR DATA_DIR`) this file is one of the two training processes: it joins
the other through main.initialize_distributed (gloo collectives), trains the
`tiny` model with the real trainer and evaluates it (each process decoding
its shard of the eval sets), then restores its last checkpoint and process
0 saves the parameters for the test to compare.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

STEPS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(script: str, *args) -> list[str]:
  """Runs `python script PORT PROCESS_ID *args` as processes 0 and 1 of one
  JAX job of 4 CPU devices each; their outputs, once both succeeded."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workers = [subprocess.Popen(
      [sys.executable, os.path.abspath(script), str(port), str(i),
       *map(str, args)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outputs = [worker.communicate(timeout=400)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output
  return outputs


def _flat_params(state) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  from omnismola.train import optim  # pylint: disable=g-import-not-at-top
  return {optim.key_path_str(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(state.params)[0]}


def _restore(config, workdir):
  from omnismola.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from omnismola.train import optim  # pylint: disable=g-import-not-at-top
  from omnismola.train import partitioning  # pylint: disable=g-import-not-at-top
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(dict(config.mesh))
  _, abstract, _ = trainer.create_state(config, mesh,
                                        optim.make_optimizer(config.train))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=3)
  restored = ckpt.restore_latest(abstract)
  ckpt.close()
  return restored


def _config(data_dir):
  """The tiny model, evaluated at the end on 11 examples of two tasks.

  11 examples over 2 processes in global batches of 8 (4 per process): 6
  and 5, so both processes decode 2 batches and pad 2 and 3 rows.
  """
  from test_trainer import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, steps=STEPS, checkpoint_every=STEPS)
  config.eval.update(dict(at_end=True, tasks=("synthetic_vqa",
                                              "synthetic_ocr"),
                          batch_size=8, max_examples=11, max_new_tokens=4))
  return config


def test_two_processes_train_evaluate_and_one_restores(synthetic_data_dir,
                                                       tmp_path):
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  run_two_processes(__file__, tmp_path, synthetic_data_dir)

  with open(tmp_path / "train_metrics.jsonl") as f:
    assert len(f.readlines()) == STEPS  # Process 0 alone writes metrics.
  step, state, data, _ = _restore(_config(synthetic_data_dir), tmp_path)
  # Process 0's input state; data=8 over 2 hosts: each reads its own shard.
  assert step == STEPS and data["batches_consumed"] == STEPS
  assert data["shard"] == [0, 2]
  saved = np.load(tmp_path / "params_2x4.npz")
  restored = _flat_params(state)
  assert sorted(saved.files) == sorted(restored)
  for key, value in restored.items():
    np.testing.assert_array_equal(value, saved[key], err_msg=key)

  # One process evaluating the same checkpoint scores the same predictions.
  with open(tmp_path / "eval" / f"metrics_{STEPS}.json") as f:
    two_processes = json.load(f)["tasks"]
  one_process = trainer.evaluate_checkpoint(_config(synthetic_data_dir),
                                            str(tmp_path))
  assert set(two_processes) == {"synthetic_vqa", "synthetic_ocr"}
  for task, result in one_process.items():
    assert two_processes[task]["num_examples"] == 11
    assert two_processes[task] == result, task


def _check_rows_come_back(config) -> None:
  """Each process gets its own rows back from a global batch computed on,
  as evaluation gets its predictions (the tiny model's are too uniform to
  show a mix-up)."""
  import jax  # pylint: disable=g-import-not-at-top
  from omnismola.train import host_shards  # pylint: disable=g-import-not-at-top
  from omnismola.train import partitioning  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(dict(config.mesh))
  put = host_shards.make_put_batch(mesh, partitioning.config_rules(config))
  rows = np.arange(12, dtype=np.int32).reshape(4, 3) + 100 * (
      jax.process_index() + 1)
  global_rows = put({"text": rows})["text"]
  doubled = jax.jit(lambda x: 2 * x, out_shardings=global_rows.sharding)(
      global_rows)
  np.testing.assert_array_equal(partitioning.process_local_rows(doubled),
                                2 * rows)


def _worker(port: str, process_id: str, workdir: str, data_dir: str) -> None:
  """One of the two training processes (see the module docstring)."""
  from omnismola import main  # pylint: disable=g-import-not-at-top
  main.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert (jax.process_count(), jax.device_count()) == (2, 8)
  config = _config(data_dir)
  trainer.train_and_evaluate(config, workdir)
  _check_rows_come_back(config)
  _, state, _, _ = _restore(config, workdir)
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "params_2x4.npz"),
             **_flat_params(state.replace(params=params)))


if __name__ == "__main__":
  _worker(*sys.argv[1:])
