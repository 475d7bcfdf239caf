"""Greedy decoding over every task's evaluation set, then per-task metrics.

The evaluator is handed its inputs (eval sets, a detokenizer) by the caller, so
this package needs neither TensorFlow nor SeqIO.
"""
import json
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from absl import logging

from omnismola.eval import metrics as metrics_lib


def predict_texts(decode_fn: Callable, batches: Iterable[dict],
                  detokenize: Callable[[Sequence[int]], str]):
  """Yields (prediction, references) for every real example of `batches`."""
  for batch in batches:
    tokens = np.asarray(jax.device_get(decode_fn(batch)))
    for row, real, refs in zip(tokens, batch["example_mask"],
                               batch["references"]):
      if real:
        yield detokenize(row.tolist()), list(refs)


def evaluate(decode_fn: Callable, eval_sets, *,
             detokenize: Callable[[Sequence[int]], str]) -> dict[str, dict]:
  """Per-task results {task: {metric, value, num_examples, examples}}.

  `decode_fn(host_batch)` returns the generated token ids [B, N] of an eval
  batch (it places the prompt on the mesh itself). `examples` keeps a few
  (prediction, references) pairs so people can see what the model says.
  """
  if jax.process_count() > 1:
    raise NotImplementedError(
        "Evaluation currently runs on one process; run --mode=eval on a "
        "single host, or set --config.eval.every=0 for multi-host training.")
  results = {}
  for eval_set in eval_sets:
    start = time.perf_counter()
    pairs = list(predict_texts(decode_fn, eval_set.batches(), detokenize))
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    value = metrics_lib.compute(eval_set.metric, predictions, references)
    results[eval_set.name] = dict(
        metric=eval_set.metric, value=float(value), num_examples=len(pairs),
        examples=[dict(prediction=p, references=r) for p, r in pairs[:5]])
    logging.info("eval %s: %s = %.2f on %d examples (%.1fs)", eval_set.name,
                 eval_set.metric, value, len(pairs),
                 time.perf_counter() - start)
  return results


def write_results(workdir: str, step: int, results: dict) -> str:
  """Writes <workdir>/eval/metrics_<step>.json (process 0 only)."""
  path = os.path.join(workdir, "eval", f"metrics_{step}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(dict(step=step, tasks=results), f, indent=2)
  return path


def format_table(results: dict, chance: dict[str, float] | None = None) -> str:
  """A plain-text table of per-task metrics."""
  header = ["task", "metric", "value", "examples"]
  if chance:
    header.insert(3, "chance")
  rows = []
  for name, r in results.items():
    row = [name, r["metric"], f"{r['value']:.2f}", str(r["num_examples"])]
    if chance:
      row.insert(3, f"{chance[name]:.2f}" if name in chance else "-")
    rows.append(row)
  widths = [max(len(x) for x in col) for col in zip(header, *rows)]
  fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths))
  lines = [fmt(header), "  ".join("-" * w for w in widths)]
  lines += [fmt(row) for row in rows]
  return "\n".join(lines)
