"""Partial initialisation from another run's (or a converted) checkpoint.

Parameters whose path and shape match are loaded; the rest (new experts,
routers) keep their fresh initialisation. Optimizer state and step start anew,
which is what a new stage of a multi-stage recipe wants.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from omnismola.train import logging as log_lib
from omnismola.train import optim


def _flat(tree) -> dict[str, object]:
  return {optim.key_path_str(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def resolve_step_dir(path: str) -> str:
  """A step directory from a workdir, a checkpoints dir or a step dir."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if os.path.isdir(os.path.join(path, "state")):
    return path
  steps = [int(d) for d in os.listdir(path) if d.isdigit()] \
      if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(
        f"config.init.checkpoint={path!r}: no checkpoint found (expected a "
        "workdir, its checkpoints/ directory or one step directory).")
  return os.path.join(path, str(max(steps)))


def load_partial(path: str, state, abstract_state):
  """Returns `state` with params/frozen replaced where the checkpoint has them.

  `abstract_state` gives the target shardings. Shapes that differ are an
  error: silently re-initialising a mismatched layer hides config mistakes.
  """
  step_dir = resolve_step_dir(path)
  saved = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  source = {}
  for group in ("params", "frozen"):
    source.update(_flat(saved.get(group, {})))

  loaded, fresh = [], []

  def merge_group(current, abstract):
    flat_current = _flat(current)
    flat_abstract = _flat(abstract)
    leaves = []
    for key, value in flat_current.items():
      if key in source:
        if tuple(source[key].shape) != tuple(value.shape):
          raise ValueError(
              f"init.checkpoint {step_dir}: {key} has shape "
              f"{tuple(source[key].shape)} there but {tuple(value.shape)} in "
              "this model.")
        leaves.append(jax.device_put(np.asarray(source[key], value.dtype),
                                     flat_abstract[key].sharding))
        loaded.append(key)
      else:
        leaves.append(value)
        fresh.append(key)
    return jax.tree.unflatten(jax.tree.structure(current), leaves)

  state = state.replace(params=merge_group(state.params, abstract_state.params),
                        frozen=merge_group(state.frozen, abstract_state.frozen))
  if not loaded:
    raise ValueError(f"init.checkpoint {step_dir} shares no parameter path "
                     "with this model.")
  log_lib.print_line(
      f"Initialised {len(loaded)} parameter arrays from {step_dir}; "
      f"{len(fresh)} keep their fresh initialisation.")
  logging.info("Freshly initialised: %s", fresh)
  return state
