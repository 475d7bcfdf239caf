"""Metric writers (JSON lines + TensorBoard) and the progress line."""
import contextlib
import io
import json
import math
import os
import time
import types

import jax
from absl import logging

from omnismola import storage
from omnismola import flops


class MetricWriter:
  """Appends scalars to <workdir>/train_metrics.jsonl and to TensorBoard
  (tensorboardX, which needs no TensorFlow), from process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._workdir = storage.path(workdir)
    self.path = self._workdir / "train_metrics.jsonl"
    # Opened at the first write, so that a run failing before its first
    # log line (bad data, a refused resume) leaves no files behind.
    self._tb = None
    self._tb_opened = False

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    if not self._tb_opened:
      self._workdir.mkdir(parents=True, exist_ok=True)
      self._tb, self._tb_opened = _tensorboard(self._workdir), True
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    storage.append_text(self.path, json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _tensorboard(workdir):
  """A tensorboardX SummaryWriter of <workdir>/tensorboard/train_metrics,
  or None (with a warning) where tensorboardX is not installed."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("tensorboardX is not installed: no TensorBoard events.")
    return None
  if storage.is_url(workdir):
    # Ours replaces tensorboardX's own writer for the scheme (if it has
    # one), so events go through the same client as every other file. A
    # bucket has no folders to create.
    record_writer.register_writer_factory(
        os.fspath(workdir).split("://")[0], types.SimpleNamespace(
            open=_BucketEventFile, directory_check=lambda location: None))
  return SummaryWriter(os.fspath(workdir / "tensorboard" / "train_metrics"))


class _BucketEventFile:
  """A TensorBoard event file in a bucket, written for tensorboardX: each
  flush uploads it whole (an object cannot be appended to)."""

  def __init__(self, location: str):
    self._file = storage.path(location)
    self._data = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._data.write(data)

  def flush(self) -> None:
    self._file.write_bytes(self._data.getvalue())

  close = flush


def truncate_after(path: str, step: int) -> None:
  """Drops JSON lines with step > `step` (a dead run's), and, with a
  warning, a line cut short by a crash."""
  file = storage.path(path)
  if not file.exists():
    return
  kept = []
  for number, line in enumerate(file.read_text().splitlines(), 1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      logging.warning("%s: dropping line %d, cut short by a crash: %r",
                      path, number, line)
      continue
    if record["step"] <= step:
      kept.append(line + "\n")
  file.write_text("".join(kept))


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else \
      f"{minutes}:{seconds:02d}"


class Progress:
  """Throughput, model FLOP rate, MFU and ETA over this process's steps.

  A step trains `global_batch` rows of `tokens_per_row` tokens and
  `flops_per_row` model FLOPs each (trainer.row_cost); `mfu` is logged
  where the device's `peak_flops` is known (docs/performance.md).
  """

  def __init__(self, first_step: int, total_steps: int, global_batch: int, *,
               tokens_per_row: int, flops_per_row: float,
               num_devices: int, peak_flops: float | None,
               clock=time.perf_counter):
    self.first_step = first_step
    self.total_steps = total_steps
    self.global_batch = global_batch
    self.tokens_per_row = tokens_per_row
    self.flops_per_step = flops_per_row * global_batch
    self.num_devices = num_devices
    self.peak_flops = peak_flops
    self._clock = clock
    self._start = self._last_time = None
    self._start_step = self._last_step = first_step

  def start(self, step: int) -> None:
    """Called after the first (compiling) step so compile time is excluded."""
    self._start = self._last_time = self._clock()
    self._start_step = self._last_step = step

  @contextlib.contextmanager
  def pause(self):
    """A context in which time does not count (evaluation mid-run)."""
    entered = self._clock()
    yield
    if self._start is not None:
      spent = self._clock() - entered
      self._start += spent
      self._last_time += spent

  def update(self, step: int,
             examples_per_step: float | None = None) -> dict[str, float]:
    """Throughput since the last update; `examples_per_step` (default: one
    per row) counts packed rows' examples."""
    now = self._clock()
    if self._last_time is None or step <= self._last_step:
      return {}
    rate = (step - self._last_step) / (now - self._last_time)
    self._last_time, self._last_step = now, step
    out = {"steps_per_sec": rate,
           "examples_per_sec": rate * (examples_per_step or
                                       self.global_batch),
           "tokens_per_sec": rate * self.global_batch * self.tokens_per_row,
           "tflops_per_device": (self.flops_per_step * rate /
                                 self.num_devices / 1e12)}
    if self.peak_flops is not None:
      out["mfu"] = flops.mfu(self.flops_per_step, 1 / rate, self.num_devices,
                             self.peak_flops)
    return out

  def eta_seconds(self, step: int) -> float:
    if self._start is None or step <= self._start_step:
      return math.inf
    rate = (step - self._start_step) / (self._clock() - self._start)
    return (self.total_steps - step) / rate

  def line(self, step: int, loss: float, examples_per_sec: float | None) -> str:
    width = len(str(self.total_steps))
    parts = [f"step {step:>{width}}/{self.total_steps}", f"loss {loss:.4f}"]
    if examples_per_sec:
      parts.append(f"{examples_per_sec:,.1f} ex/s")
    parts.append(f"ETA {format_duration(self.eta_seconds(step))}")
    return " | ".join(parts)


def peak_memory() -> dict[str, float]:
  """{"peak_memory_gib": the largest allocator peak of this host's devices},
  or {} where devices keep no statistics (CPU)."""
  peaks = [stats["peak_bytes_in_use"] for stats in
           (d.memory_stats() for d in jax.local_devices())
           if stats and "peak_bytes_in_use" in stats]
  return {"peak_memory_gib": max(peaks) / 2**30} if peaks else {}


def print_line(text: str, file=None) -> None:
  """A line for people from process 0: on stdout (progress), or `file`."""
  if jax.process_index() == 0:
    print(text, file=file, flush=True)
