"""Evaluation of a train state on its mesh, as training and --mode=eval run
it."""
import functools

import jax

from omnismola.eval import decode as decode_lib
from omnismola.eval import evaluator
from omnismola.train import host_shards
from omnismola.train import logging as log_lib
from omnismola.train import partitioning


def make_decode_fn(parts, mesh, rules, shard: host_shards.HostShard,
                   max_new_tokens: int, eos_id: int):
  """decode_fn(state, host_batch) -> this host's generated ids [B, N] by
  the model `parts` (trainer.ModelParts) rebuilds from the state.

  Every host passes the rows of its `shard` of the global batch; the decode
  runs once over the global batch, and each host gets back the rows of its
  own batch, in order.
  """
  put_batch = host_shards.make_put_batch(mesh, rules, shard)

  @jax.jit
  def decode(params, frozen, batch):
    model = parts.merge(params, frozen)
    tokens = decode_lib.greedy_decode(model, batch,
                                      max_new_tokens=max_new_tokens,
                                      eos_id=eos_id)
    # Laid out like the prompt, so each host's rows stay on its devices.
    return jax.lax.with_sharding_constraint(
        tokens, partitioning.batch_sharding(mesh, rules, tokens.shape))

  def decode_fn(state, batch: dict):
    prompt = put_batch({k: batch[k] for k in decode_lib.PROMPT_KEYS})
    return partitioning.process_local_rows(
        decode(state.params, state.frozen, prompt))

  return decode_fn


def make_eval_runner(config, workdir, built, pipeline):
  """run_eval(step, state): evaluates every task of config.eval.split with
  `built`'s model (a trainer.Setup), writes the metrics and predictions,
  prints a table. The data must already be prepared (`pipeline.prepare`);
  the eval tasks and their split are checked here, before any training.
  """
  vocabulary = pipeline.get_vocabulary(config.data)
  # config.eval.batch_size is global, as train.batch_size is; hosts whose
  # devices hold the same rows decode the same shard (host_shards.py).
  shard = host_shards.host_shard(built.mesh, built.rules,
                                 config.eval.batch_size)
  decode_fn = make_decode_fn(built.parts, built.mesh, built.rules, shard,
                             config.eval.max_new_tokens, vocabulary.eos_id)
  detokenize = functools.partial(pipeline.detokenize, vocabulary=vocabulary)
  split = config.eval.split
  make_eval_sets = functools.partial(
      pipeline.make_eval_sets, config.data,
      batch_size=config.eval.batch_size // shard.count, split=split,
      tasks=list(config.eval.tasks) or None,
      max_examples=config.eval.max_examples or None,
      process_index=shard.index, process_count=shard.count)
  make_eval_sets()  # Reads nothing; fails now on an unknown task or split.

  def run_eval(step: int, state) -> dict:
    results, predictions = evaluator.evaluate(
        functools.partial(decode_fn, state), make_eval_sets(),
        detokenize=detokenize)
    path = evaluator.write_results(workdir, step, results, split)
    evaluator.write_predictions(workdir, step, predictions, split)
    chance = pipeline.chance_levels(config.data)
    log_lib.print_line(
        f"\nEvaluation of the {split} split at step {step} ({path}, and "
        "each task's predictions beside it):\n" +
        evaluator.format_table(results, chance))
    return results

  return run_eval
