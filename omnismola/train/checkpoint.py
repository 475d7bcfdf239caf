"""Orbax checkpoints in <workdir>/checkpoints: state, input state and config.

A step holds `state`, `data` (every process's input state, JSON:
{"processes": [state of process 0, ...]}) and `config`. Nothing is deleted
because it could not be read: a read error may be the storage's
(docs/training.md, "Checkpoints").
"""
import json
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from omnismola import storage


def all_process_states(state: dict) -> list[dict]:
  """Every process's JSON-serialisable `state`, in process order (a
  collective). UTF-8 bytes padded to a power of two, so that states growing
  by a digit rarely compile a new gather."""
  data = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(data)))
  padded = np.zeros(1 << int(np.max(lengths) - 1).bit_length(), np.uint8)
  padded[:len(data)] = data
  everyone = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n])) for row, n in zip(everyone, lengths)]


def state_of_process(saved: dict, process_index: int) -> dict:
  """A process's input state from a checkpoint's `data` item; process 0's
  for a process the saving run did not have (every host consumed the same
  number of batches; the pipeline warns that the shard differs)."""
  states = saved["processes"]
  return states[process_index if process_index < len(states) else 0]


def all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective)."""
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# A failed read is tried again after RETRY_SECONDS, READ_ATTEMPTS times in
# all: storage errors are often transient.
READ_ATTEMPTS, RETRY_SECONDS = 2, 1.0


class Restored(NamedTuple):
  """A checkpoint read back by every process."""
  step: int
  state: Any
  data: dict    # This process's input state.
  config: dict  # The config the checkpoint was saved with.


class Checkpointer:
  """An Orbax CheckpointManager with our three items; a `read_only` one
  (evaluating a run training elsewhere) creates, cleans and deletes nothing.
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool = True,
               read_only: bool = False):
    self.directory = storage.path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, read_only=read_only, create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save))
    # Reads go to the items' handlers, not through the manager, whose
    # restore ends in a barrier that a process whose read failed would
    # skip, leaving the processes out of step.
    self._reader = ocp.CompositeCheckpointHandler()
    self._restored_step = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_dict: dict) -> None:
    """Starts an (asynchronous) save; every process calls it together. A
    checkpoint of `step` from before this run is replaced (not every process
    could read it), unless this run resumed from it."""
    if step in self.manager.all_steps():
      if step == self._restored_step:
        return
      logging.warning("Replacing %s, which not every process could read when "
                      "this run resumed, with this run's step %d.",
                      self.step_dir(step), step)
      self.manager.delete(step)
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(
                {"processes": all_process_states(data_state)}),
            config=ocp.args.JsonSave(json.loads(json.dumps(config_dict)))),
        force=True)

  def restore_latest(
      self, abstract_state,
      check_config: Callable[[dict, int], Any] = lambda config, step: None
  ) -> Restored | None:
    """The newest checkpoint every process can read, or None if there is none.

    `abstract_state` (ShapeDtypeStructs with shardings) puts the arrays on
    the current mesh. A step some process could not read is skipped by all,
    with a warning, and kept. `check_config(saved config, step)` runs on
    every process before a step's state is read, and raises to stop. If no
    step can be read, the newest one's error is raised.
    """
    steps = self._steps_every_process_lists()
    first_error = None
    for step in steps:
      saved, error = self._read_everywhere(step, config=ocp.args.JsonRestore())
      if saved is not None:
        check_config(saved.config, step)
        logging.info("Restoring checkpoint of step %d from %s", step,
                     self.directory)
        restored, error = self._read_everywhere(
            step, state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore())
        if restored is not None:
          self._restored_step = step
          return Restored(step, restored.state,
                          state_of_process(restored.data, jax.process_index()),
                          saved.config)
      logging.warning("Checkpoint %s is unreadable%s; keeping it and trying "
                      "the previous one.", self.step_dir(step),
                      f" ({type(error).__name__}: {error})" if error else
                      " by another process")
      first_error = first_error or error
    if not steps:
      return None
    raise first_error or RuntimeError(
        f"No checkpoint in {self.directory} could be read by every process; "
        "the others' logs say why.")

  def _steps_every_process_lists(self) -> list[int]:
    """The steps on disk, newest first, that every process lists."""
    listed = all_process_states({"steps": list(self.manager.all_steps())})
    return sorted(set.intersection(*(set(p["steps"]) for p in listed)),
                  reverse=True)

  def _read_everywhere(self, step: int, **items):
    """(`items` of `step`, None) if every process read them, else (None,
    this process's error or None). A collective."""
    restored, error = None, None
    for attempt in range(READ_ATTEMPTS):
      if attempt:
        time.sleep(RETRY_SECONDS)
      try:
        restored = self._reader.restore(self.step_dir(step),
                                        ocp.args.Composite(**items))
        break
      # Orbax and TensorStore raise many types for a missing or bad file.
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e
    if all_processes(restored is not None):
      return restored, None
    return None, error

  def step_dir(self, step: int):
    return self.directory / str(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    # The manager cleans a dead run's temporary directories in a thread it
    # starts at construction and awaits only before a save; its close()
    # does not, and a run that stops before saving (a changed config on
    # resume) would exit under that thread, which then prints a traceback.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory",
                            None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()
    self._reader.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` placed with `shardings` (same structure)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
