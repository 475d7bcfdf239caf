"""The training objective: next-token NLL on the target tokens, per task.

Position i of a row predicts token i + 1; `mask_loss` marks the targets (the
suffix). Packed rows (row_layout.py) are told apart by `segment_ids`.
"""
import jax
import jax.numpy as jnp
import optax

from omnismola.models import vlm


def target_weights(mask_loss):
  """float [B, L-1]: 1 where position i's prediction of token i+1 counts."""
  return mask_loss[:, 1:].astype(jnp.float32)


def target_nll(logits, text, mask_loss):
  """(nll [B, L-1] of each target token, 0 elsewhere; its weights).

  Packed rows need nothing more: an example's last token is never followed
  by a target of the next example (a prefix comes first).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets, weights = text[:, 1:], target_weights(mask_loss)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return nll * weights, weights


def target_tasks(batch) -> jax.Array:
  """int [B, L-1]: the task of the target token each position predicts,
  from task_id [B], or, in packed rows, task_id [B, M] and segment_ids."""
  if "segment_ids" not in batch:
    return jnp.broadcast_to(batch["task_id"][:, None],
                            batch["text"][:, 1:].shape)
  slot = jnp.maximum(batch["segment_ids"][:, 1:] - 1, 0)
  return jnp.take_along_axis(batch["task_id"], slot, axis=1)


def count_examples(batch) -> jax.Array:
  """The examples in a batch: one per row, or the filled slots of packed
  rows."""
  if "segment_ids" not in batch:
    return jnp.asarray(batch["task_id"].shape[0], jnp.int32)
  return jnp.sum(vlm.filled_slots(batch["segment_ids"],
                                  batch["task_id"].shape[1]), dtype=jnp.int32)
