"""Greedy decoding over every task's evaluation set, then per-task metrics.

The evaluator is handed its inputs (eval sets, a detokenizer) by the caller, so
this package needs neither TensorFlow nor SeqIO.

On several hosts each host decodes its own shard of every eval set (as many
batches as every other host), then the hosts exchange their records over the
JAX collectives (no shared file system needed), put them back in the split's
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

from omnismola import storage
from omnismola.eval import metrics as metrics_lib


def predict_texts(decode_fn: Callable, batches: Iterable[dict],
                  detokenize: Callable[[Sequence[int]], str]):
  """Yields (example index, record) for every real example of `batches`.

  The index is the example's position in the whole split; the record is
  {id, prompt, prediction, references}, the id the example's own (batches'
  `ids`) or else its index.
  """
  for batch in batches:
    tokens = np.asarray(jax.device_get(decode_fn(batch)))
    ids = batch.get("ids") or batch["example_index"].tolist()
    for i, row in enumerate(tokens):
      if batch["example_mask"][i]:
        prompt = batch["text"][i][batch["mask_input"][i] == 1]
        yield int(batch["example_index"][i]), dict(
            id=ids[i], prompt=detokenize(prompt.tolist()),
            prediction=detokenize(row.tolist()),
            references=list(batch["references"][i]))


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


def predict_split(decode_fn: Callable, batches: Iterable[dict],
                  detokenize: Callable[[Sequence[int]], str]) -> list[dict]:
  """The records (`predict_texts`) of a whole split, in the split's order,
  on every host; each host passes the batches of its own shard."""
  local = list(predict_texts(decode_fn, batches, detokenize))
  # By example index: hosts reading the same shard send the same records.
  records = dict(gather_from_processes(local))
  return [records[i] for i in sorted(records)]


def evaluate(decode_fn: Callable, eval_sets, *,
             detokenize: Callable[[Sequence[int]], str]
             ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
  """(per-task results {task: {metric, value, num_examples, examples}},
  per-task predictions {task: [{id, prompt, prediction, references}]}).

  `decode_fn(host_batch)` returns the generated token ids [B, N] of this
  host's eval batch (it places the prompt on the mesh itself and hands back
  this host's rows). `examples` keeps the split's first few (prediction,
  references) pairs so people can see what the model says. Every host must
  call this with its own shard of the same eval sets.
  """
  results, predictions = {}, {}
  for eval_set in eval_sets:
    start = time.perf_counter()
    records = predict_split(decode_fn, eval_set.batches(), detokenize)
    value = metrics_lib.compute(eval_set.metric,
                                [r["prediction"] for r in records],
                                [r["references"] for r in records])
    results[eval_set.name] = dict(
        metric=eval_set.metric, value=float(value),
        num_examples=len(records),
        examples=[dict(prediction=r["prediction"],
                       references=r["references"]) for r in records[:5]])
    predictions[eval_set.name] = records
    logging.info("eval %s: %s = %.2f on %d examples (%.1fs)", eval_set.name,
                 eval_set.metric, value, len(records),
                 time.perf_counter() - start)
  return results, predictions


def _tag(step: int, split: str) -> str:
  """`step`, or `split_step` for a split other than the usual validation
  one, so that scoring another split never overwrites those files."""
  return str(step) if split == "validation" else f"{split}_{step}"


def _write_text(path, text: str) -> str:
  """Writes `text` to `path` (process 0 only: every process holds it)."""
  path = storage.path(path)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return os.fspath(path)


def write_results(workdir: str, step: int, results: dict,
                  split: str = "validation") -> str:
  """Writes <workdir>/eval/metrics_<step>.json (metrics_<split>_<step>.json
  for another split than validation)."""
  return _write_text(
      storage.path(workdir) / "eval" / f"metrics_{_tag(step, split)}.json",
      json.dumps(dict(step=step, split=split, tasks=results), indent=2))


def write_jsonl(path, records: Iterable[dict]) -> str:
  """Writes `records` to `path`, one JSON object a line."""
  return _write_text(path, "".join(json.dumps(record, ensure_ascii=False) +
                                   "\n" for record in records))


def write_predictions(workdir: str, step: int,
                      predictions: dict[str, list[dict]],
                      split: str = "validation") -> list[str]:
  """Writes <workdir>/eval/predictions_<task>_<step>.jsonl per task
  (predictions_<task>_<split>_<step>.jsonl for another split than
  validation): one {id, prompt, prediction, references} object per
  example, in the split's order, for reading or for a test server."""
  return [write_jsonl(storage.path(workdir) / "eval" /
                      f"predictions_{task}_{_tag(step, split)}.jsonl",
                      records)
          for task, records in predictions.items()]


def format_table(results: dict, chance: dict[str, float] | None = None) -> str:
  """A plain-text table of per-task metrics."""
  rows = [["task", "metric", "value", "chance", "examples"]]
  for name, r in results.items():
    rows.append([name, r["metric"], f"{r['value']:.2f}",
                 f"{chance[name]:.2f}" if name in (chance or {}) else "-",
                 str(r["num_examples"])])
  if not chance:
    rows = [row[:3] + row[4:] for row in rows]
  widths = [max(len(x) for x in col) for col in zip(*rows)]
  lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
