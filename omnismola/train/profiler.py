"""Traces a window of training steps with the JAX profiler.

`config.profile.first_step` and `config.profile.steps` choose the window:
steps first_step, ..., first_step + steps - 1 (numbered as in the log, the
first step is 1); `steps=0` traces nothing. The trace goes to
`<workdir>/profile/plugins/profile/<run>/<host>.xplane.pb`, the layout
TensorBoard's profile plugin reads (`tensorboard --logdir=<workdir>`). Every
host traces its own devices.
"""
import jax
from absl import logging


class StepTrace:
  """Starts the trace before the window's first step, stops after its last.

  The loop calls `before_step(n)` before dispatching step n and
  `after_step(n, outputs)` after; `close()` stops a trace the run left
  open (it ended or was stopped inside the window).
  """

  def __init__(self, first_step: int, steps: int, log_dir: str):
    if first_step < 1:
      raise ValueError("config.profile.first_step must be >= 1 (the first "
                       f"step is 1), got {first_step}.")
    if steps < 0:
      raise ValueError(f"config.profile.steps must be >= 0 (0 = no trace), "
                       f"got {steps}.")
    self.first_step = first_step
    self.last_step = first_step + steps - 1
    self.log_dir = log_dir
    self.active = False

  def before_step(self, step: int) -> None:
    if step == self.first_step and step <= self.last_step:
      logging.info("Tracing steps %d-%d to %s.", self.first_step,
                   self.last_step, self.log_dir)
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after_step(self, step: int, outputs) -> None:
    if self.active and step >= self.last_step:
      self._stop(outputs)

  def close(self) -> None:
    if self.active:
      self._stop(None)

  def _stop(self, outputs) -> None:
    # Steps are dispatched asynchronously: wait for the device work, or the
    # trace would end before the traced steps do.
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
