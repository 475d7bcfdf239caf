"""Two processes agree on the checkpoint to resume from when one of them
cannot read the newest.

Run as a script (`python tests/test_checkpoint_multihost.py PORT PROCESS_ID
DIRECTORY`) this file is one of the two processes: they save checkpoints 2
and 4 together, process 1 fails to read step 4's state, and each writes the
step it restored to `DIRECTORY/restored_<process>.json`.
"""
import json
import os
import sys

from test_trainer_multihost import run_two_processes


def test_a_step_one_process_cannot_read_is_skipped_by_both_and_kept(
    tmp_path):
  outputs = run_two_processes(__file__, tmp_path)
  for process in (0, 1):
    with open(tmp_path / f"restored_{process}.json") as f:
      assert json.load(f) == {"step": 2, "on_disk": ["2", "4"]}
  assert "step 4's state is unavailable here" in outputs[1]
  assert "unreadable by another process" in outputs[0]


def _worker(port: str, process_id: str, directory: str) -> None:
  """One of the two processes (see the module docstring)."""
  from omnismola import main  # pylint: disable=g-import-not-at-top
  main.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from omnismola.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from omnismola.train import optim  # pylint: disable=g-import-not-at-top
  from omnismola.train import partitioning  # pylint: disable=g-import-not-at-top
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  from test_trainer import tiny_config  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  config = tiny_config()
  mesh = partitioning.make_mesh(dict(config.mesh))
  init_fn, abstract, _ = trainer.create_state(
      config, mesh, optim.make_optimizer(config.train))
  state = init_fn(jax.random.key(0))
  checkpoints = os.path.join(directory, "checkpoints")
  ckpt = checkpoint_lib.Checkpointer(checkpoints, keep=3)
  for step in (2, 4):
    ckpt.save(step, state, {"batches_consumed": step}, config.to_dict())
  ckpt.close()

  restore = ocp.CompositeCheckpointHandler.restore

  def fails_on_step_4_here(self, path, args):
    if jax.process_index() == 1 and "state" in args and path.name == "4":
      raise OSError("step 4's state is unavailable here")
    return restore(self, path, args)

  ocp.CompositeCheckpointHandler.restore = fails_on_step_4_here
  checkpoint_lib.RETRY_SECONDS = 0
  ckpt = checkpoint_lib.Checkpointer(checkpoints, keep=3)
  step, _, _, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  with open(os.path.join(directory, f"restored_{jax.process_index()}.json"),
            "w") as f:
    json.dump({"step": step, "on_disk": sorted(os.listdir(checkpoints))}, f)


if __name__ == "__main__":
  _worker(*sys.argv[1:])
