"""Orbax checkpoints in <workdir>/checkpoints: state, input state and config.

One step directory holds three items saved together: `state` (parameters,
optimizer state and step, restored onto whatever mesh the new run has),
`data` (the input iterator state of every process, JSON:
{"processes": [state of process 0, state of process 1, ...]}, gathered from
all hosts when saving) and `config` (the resolved config, JSON). Saves are
asynchronous; only the last `keep` steps are kept. A run resumes from the
newest checkpoint it can read (`restore_latest`); each process gets its own
input state back.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


def all_process_states(state: dict) -> list[dict]:
  """Every process's JSON-serialisable `state`, in process order.

  A collective: every process calls it at the same point. The states travel
  as UTF-8 bytes through `process_allgather`, padded to a power of two so
  that states growing by a digit rarely compile a new gather.
  """
  data = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(data)))
  padded = np.zeros(1 << int(np.max(lengths) - 1).bit_length(), np.uint8)
  padded[:len(data)] = data
  everyone = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n])) for row, n in zip(everyone, lengths)]


def state_of_process(saved: dict, process_index: int) -> dict:
  """A process's input state from a checkpoint's `data` item.

  A process the saving run did not have takes process 0's state: every host
  consumed the same number of batches, and the pipeline warns that the
  shard it now reads differs.
  """
  states = saved["processes"]
  return states[process_index if process_index < len(states) else 0]


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
    """Starts an (asynchronous) save of everything needed to resume.

    `data_state` is this process's input state; every process calls `save`
    together, and the checkpoint holds all of theirs.
    """
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(
                {"processes": all_process_states(data_state)}),
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
    return restored.state, state_of_process(restored.data,
                                            jax.process_index())

  def restore_latest(self, abstract_state):
    """(step, state, data state) of the newest readable checkpoint, or None.

    A checkpoint can be unreadable when a host died mid-write or storage lost
    a file. Rather than failing the job (or silently starting over), resume
    from the previous checkpoint, warn naming the broken one, and delete it
    so training can write that step again. If no checkpoint can be read, the
    newest one's error is raised: that is usually a config that no longer
    matches the checkpoints.
    """
    unreadable, first_error = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
      # Orbax and TensorStore raise many types for a missing or bad file.
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.warning("Checkpoint %s is unreadable (%s: %s); trying the "
                        "previous one.", self.step_dir(step),
                        type(e).__name__, e)
        unreadable.append(step)
        first_error = first_error or e
        continue
      for bad in unreadable:
        logging.warning("Resuming from step %d; deleting the unreadable %s.",
                        step, self.step_dir(bad))
        self.manager.delete(bad)
      return step, state, data
    if first_error is not None:
      raise first_error
    return None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

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
