"""When the training loop stops early: preemption (SIGTERM) and non-finite
steps."""
import signal

from absl import logging


class StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

  def __enter__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing, then stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or update."""


class NonFiniteGuard:
  """A loop hook (hooks.py) that gives up after `limit` consecutive skipped
  (non-finite) steps. Each step's flag is read after the next step has been
  dispatched, so the host never makes the device wait."""

  def __init__(self, limit: int):
    self.limit = limit
    self.streak = 0
    self._unread = None  # (step, flag) of the latest step.

  def __call__(self, step: int, _state, metrics: dict) -> None:
    self.flush()
    self._unread = (step, metrics["nonfinite"])

  def flush(self) -> None:
    """Checks the latest step's flag."""
    if self._unread is None:
      return
    (step, flag), self._unread = self._unread, None
    if not int(flag):
      self.streak = 0
      return
    self.streak += 1
    logging.warning("Step %d: non-finite loss, gradient or update; update "
                    "skipped (%d in a row).", step, self.streak)
    if self.streak >= self.limit:
      raise NonFiniteError(
          f"Steps {step - self.streak + 1}-{step}: the loss, gradients or "
          f"updated parameters were non-finite {self.streak} times in a row "
          f"(config.train.max_nonfinite_steps={self.limit}); every such "
          "update was skipped and nothing non-finite was checkpointed. "
          "Stopping: lower config.train.lr, check the data, or resume from "
          "the last checkpoint.")
