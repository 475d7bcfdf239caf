"""Traces a window of training steps with the JAX profiler.

`config.profile.first_step` and `config.profile.steps` choose the window
(docs/training.md, "Profiling"). For a workdir in a bucket the trace is
written locally, then copied there: the profiler writes through its own GCS
client, which knows neither other storage nor STORAGE_EMULATOR_HOST.
"""
import pathlib
import shutil
import tempfile

import jax
from absl import logging

from omnismola import storage


class StepTrace:
  """Starts the trace before the window's first step, stops after its last
  (`after_step` is a hook, hooks.py) or at `close()`, where the run ended
  inside the window."""

  def __init__(self, first_step: int, steps: int, log_dir):
    self.first_step = first_step
    self.last_step = first_step + steps - 1
    self.log_dir = storage.path(log_dir)
    self.active = False
    self._local_dir = None

  def before_step(self, step: int) -> None:
    if step == self.first_step and step <= self.last_step:
      logging.info("Tracing steps %d-%d to %s.", self.first_step,
                   self.last_step, self.log_dir)
      self._local_dir = (tempfile.mkdtemp(prefix="profile-")
                         if storage.is_url(self.log_dir) else None)
      jax.profiler.start_trace(self._local_dir or self.log_dir)
      self.active = True

  def after_step(self, step: int, _state, metrics) -> None:
    if self.active and step >= self.last_step:
      self._stop(metrics)

  def close(self) -> None:
    if self.active:
      self._stop(None)

  def _stop(self, outputs) -> None:
    # Steps are dispatched asynchronously: wait for the device work, or the
    # trace would end before the traced steps do.
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
    if self._local_dir:
      _copy_folder(self._local_dir, self.log_dir)
      shutil.rmtree(self._local_dir)


def _copy_folder(source: str, destination) -> None:
  """Copies the local folder `source`'s files under `destination` (a URL)."""
  for local in pathlib.Path(source).rglob("*"):
    if local.is_file():
      target = destination / local.relative_to(source)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(local.read_bytes())
