"""Greedy decoding over every task's evaluation set, then per-task metrics.

The evaluator is handed its inputs (eval sets, a detokenizer) by the caller, so
this package needs neither TensorFlow nor SeqIO.

On several hosts each host decodes its own shard of every eval set (the
eval sets it is handed are that shard, in batches as many as every other
host's; hosts whose devices hold the same batch rows get the same shard),
then the hosts exchange their predictions and references over the JAX
collectives (no shared file system needed), put them back in the split's
order, once each, and each computes the same metrics over the whole split.
"""
import json
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from omnismola.eval import metrics as metrics_lib


def predict_texts(decode_fn: Callable, batches: Iterable[dict],
                  detokenize: Callable[[Sequence[int]], str]):
  """Yields (example index, prediction, references) for every real example
  of `batches` (the index is the example's position in the whole split)."""
  for batch in batches:
    tokens = np.asarray(jax.device_get(decode_fn(batch)))
    for row, real, index, refs in zip(tokens, batch["example_mask"],
                                      batch["example_index"],
                                      batch["references"]):
      if real:
        yield int(index), detokenize(row.tolist()), list(refs)


def gather_from_processes(records: list) -> list:
  """Every process's JSON-serialisable `records`, concatenated in process
  order, on every process (one process: `records` itself).

  Each process's records travel as UTF-8 JSON bytes padded to the longest
  process's, so the collectives see one fixed shape.
  """
  if jax.process_count() == 1:
    return records
  data = np.frombuffer(json.dumps(records).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [record for row, size in zip(rows, sizes)
          for record in json.loads(bytes(row[:size]).decode("utf-8"))]


def evaluate(decode_fn: Callable, eval_sets, *,
             detokenize: Callable[[Sequence[int]], str]) -> dict[str, dict]:
  """Per-task results {task: {metric, value, num_examples, examples}}.

  `decode_fn(host_batch)` returns the generated token ids [B, N] of this
  host's eval batch (it places the prompt on the mesh itself and hands back
  this host's rows). `examples` keeps the split's first few (prediction,
  references) pairs so people can see what the model says. Every host must
  call this with its own shard of the same eval sets.
  """
  results = {}
  for eval_set in eval_sets:
    start = time.perf_counter()
    local = list(predict_texts(decode_fn, eval_set.batches(), detokenize))
    # By example index: hosts reading the same shard send the same records.
    records = {record[0]: record for record in gather_from_processes(local)}
    pairs = [records[i][1:] for i in sorted(records)]
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
