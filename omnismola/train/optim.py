"""Optimizer and the trainable/frozen split of parameters by regex."""
import re

import optax
from flax import nnx


def path_str(path) -> str:
  """'decoder/layers/0/attn/q/kernel' from an NNX path tuple."""
  return "/".join(str(p) for p in path)


def trainable_filter(regex: str):
  """NNX filter: parameters whose full path matches `regex` are trained.

  Frozen parameters are split off before the optimizer is built, so they get
  no optimizer state and no gradients.
  """
  try:
    pattern = re.compile(regex)
  except re.error as e:
    raise ValueError(f"config.train.trainable: bad regex {regex!r}: {e}") from e

  def is_trainable(path, variable) -> bool:
    return (isinstance(variable, nnx.Param) and
            pattern.fullmatch(path_str(path)) is not None)

  return is_trainable


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up, then cosine decay to zero (or constant)."""
  steps, warmup = int(train_config.steps), int(train_config.warmup_steps)
  lr = float(train_config.lr)
  if train_config.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif train_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(steps - warmup, 1))
  else:
    raise ValueError(f"config.train.schedule: unknown {train_config.schedule!r}"
                     "; expected 'cosine' or 'constant'.")
  if warmup <= 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and the configured schedule."""
  parts = []
  if train_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(train_config),
                           b1=0.9, b2=0.999,
                           weight_decay=float(train_config.weight_decay)))
  return optax.chain(*parts)
