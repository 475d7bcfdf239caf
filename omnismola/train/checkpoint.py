"""Orbax checkpoints in <workdir>/checkpoints: state, input state and config.

One step directory holds three items saved together: `state` (parameters,
optimizer state and step, restored onto whatever mesh the new run has),
`data` (the input iterator state, JSON) and `config` (the resolved config,
JSON). Saves are asynchronous; only the last `keep` steps are kept.
"""
import json
import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Thin wrapper over an Orbax CheckpointManager with our three items."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_dict: dict) -> None:
    """Starts an (asynchronous) save of everything needed to resume."""
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(json.dumps(config_dict)))),
        force=True)

  def restore(self, step: int, abstract_state):
    """Restores `step` with the shapes, dtypes and shardings of the target.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct carrying shardings,
    so the arrays land directly on the current mesh whatever mesh saved them.
    """
    logging.info("Restoring checkpoint of step %d from %s", step,
                 self.directory)
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` placed with `shardings` (same structure)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
