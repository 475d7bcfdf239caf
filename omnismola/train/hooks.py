"""What the training loop does after each step besides training.

The loop calls every hook as `hook(step, state, metrics)` after step `step`
(the first is 1); each acts when it is due, as vmoe's periodic actions do.
"""
import jax
import numpy as np

from omnismola.train import logging as log_lib


def summarize(step_metrics: list[dict], task_names: list[str]) -> dict:
  """Averages the metrics of the steps since the last log line; skipped
  (non-finite) steps are counted, and left out unless every step was."""
  host = jax.device_get(step_metrics)
  applied = [m for m in host if not m["nonfinite"]] or host
  out = {k: float(np.mean([m[k] for m in applied])) for k in host[0]
         if k not in ("nonfinite", "examples", "task_nll", "task_tokens")}
  out["skipped_steps"] = float(sum(m["nonfinite"] for m in host))
  out["target_tokens_per_step"] = out.pop("target_tokens")
  # Every step consumed its examples, applied or not.
  out["examples_per_step"] = float(np.mean([m["examples"] for m in host]))
  nll = np.sum([m["task_nll"] for m in applied], axis=0)
  tokens = np.sum([m["task_tokens"] for m in applied], axis=0)
  for name, n, t in zip(task_names, nll, tokens):
    if t > 0:
      out[f"loss/{name}"] = float(n / t)
  return out


def log(every: int, last: int, task_names: list[str],
        progress: log_lib.Progress, writer: log_lib.MetricWriter,
        input_metrics):
  """Every `every` steps and after step `last`: `summarize`d metrics,
  throughput, peak memory and `input_metrics()`, written and printed."""
  pending = []

  def hook(step: int, _state, metrics: dict) -> None:
    pending.append(metrics)
    if step == progress.first_step + 1:  # Rates leave out its compilation.
      jax.block_until_ready(metrics)
      progress.start(step)
    if step % every and step != last:
      return
    scalars = summarize(pending, task_names)
    pending.clear()
    scalars.update(progress.update(step, scalars["examples_per_step"]))
    scalars.update(log_lib.peak_memory())
    scalars.update(input_metrics())
    writer.write(step, scalars)
    log_lib.print_line(progress.line(step, scalars["loss"],
                                     scalars.get("examples_per_sec")))

  return hook


def checkpoint(every: int, last: int, save):
  """save(step, state) every `every` steps and after step `last`."""
  def hook(step: int, state, _metrics) -> None:
    if step % every == 0 or step == last:
      save(step, state)

  return hook


def evaluate(every: int, last: int, run_eval, progress: log_lib.Progress):
  """run_eval(step, state) every `every` steps (0: never) before step `last`
  (the caller evaluates the end)."""
  def hook(step: int, state, _metrics) -> None:
    if every and step % every == 0 and step < last:
      with progress.pause():  # Rates and ETA are of training steps.
        run_eval(step, state)

  return hook
