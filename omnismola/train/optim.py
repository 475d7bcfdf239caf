"""Optimizer and the trainable/frozen split of parameters by regex."""
import re

import jax
import optax
from flax import nnx


def key_path_str(key_path) -> str:
  """'decoder/layers/0/attn/q/kernel' from a jax key path of a pure dict or
  an NNX path tuple (of plain names and indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                  for k in key_path)


def _compile(regex: str, field: str) -> re.Pattern:
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"{field}: bad regex {regex!r}: {e}") from e


def trainable_filter(regex: str):
  """NNX filter: parameters whose full path matches `regex` are trained."""
  pattern = _compile(regex, "config.train.trainable")

  def is_trainable(path, variable) -> bool:
    return (isinstance(variable, nnx.Param) and
            pattern.fullmatch(key_path_str(path)) is not None)

  return is_trainable


# config.train.schedule's values (schema.py checks it).
SCHEDULES = ("cosine", "constant")
# The train fields the learning rate of a step depends on.
SCHEDULE_FIELDS = ("schedule", "lr", "warmup_steps", "schedule_start", "steps")


def schedule_fields(schedule: str) -> tuple[str, ...]:
  """The SCHEDULE_FIELDS a `schedule` depends on: a constant rate never
  reaches train.steps, where a decay ends."""
  return SCHEDULE_FIELDS[:-1] if schedule == "constant" else SCHEDULE_FIELDS


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up, then cosine decay to zero (or constant), from step
  `schedule_start` (0, or where `train.extend` went on from) to `steps`."""
  start, warmup = int(train_config.schedule_start), int(
      train_config.warmup_steps)
  steps, lr = int(train_config.steps) - start, float(train_config.lr)
  if train_config.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:  # "cosine"
    decay = optax.cosine_decay_schedule(lr, max(steps - warmup, 1))
  segment = decay if warmup <= 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
  return lambda step: segment(step - start)


def scale_by_path(multipliers) -> optax.GradientTransformation:
  """Scales each parameter's update (after AdamW: its learning rate) by the
  first (regex, multiplier) matching; a regex that matches no trained
  parameter is an error when the state is built: almost always a typo."""
  rules = [(_compile(regex, "config.train.lr_multipliers"), float(m))
           for regex, m in multipliers]

  def multiplier(key_path) -> float:
    path = key_path_str(key_path)
    return next((m for p, m in rules if p.fullmatch(path)), 1.0)

  def init(params):
    paths = [key_path_str(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern, _ in rules:
      if not any(pattern.fullmatch(path) for path in paths):
        raise ValueError(f"config.train.lr_multipliers: {pattern.pattern!r} "
                         "matches no trained parameter.")
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * multiplier(path), updates), state

  return optax.GradientTransformation(init, update)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, the schedule and per-group lr scales."""
  parts = []
  if train_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(train_config),
                           b1=0.9, b2=0.999,
                           weight_decay=float(train_config.weight_decay)))
  if train_config.lr_multipliers:
    parts.append(scale_by_path(train_config.lr_multipliers))
  return optax.chain(*parts)
