"""Partial initialisation from another run's (or a converted) checkpoint.

Parameters whose path and shape match are loaded; the rest (new experts,
routers) keep their fresh initialisation. Optimizer state and step start anew,
which is what a new stage of a multi-stage recipe wants.

A sparse MoE block that replaces a dense MLP of the checkpoint (CuMo's
co-upcycling) starts with every expert a copy of that MLP
(`experts/upcycle.py`), optionally with noise; its router stays fresh.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from omnismola.experts import upcycle
from omnismola.train import logging as log_lib
from omnismola.train import optim


def flatten_by_path(tree) -> dict[str, object]:
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


def read_parameters(step_dir: str) -> dict[str, object]:
  """{path: array} of a checkpoint step's parameters, trained and frozen."""
  saved = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  parameters = {}
  for group in ("params", "frozen"):
    parameters.update(flatten_by_path(saved.get(group, {})))
  return parameters


def _nested(flat: dict, prefix: str) -> dict:
  """The subtree under `prefix/` of a flat {path: array} dict, nested."""
  tree = {}
  for key, value in flat.items():
    if key.startswith(prefix + "/"):
      *parents, leaf = key[len(prefix) + 1:].split("/")
      node = tree
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = value
  return tree


def upcycled_experts(source: dict, model: dict, *, noise_std: float = 0.0,
                     seed: int = 0) -> dict:
  """Flat {path: array} of expert weights copied from dense MLPs in `source`.

  For every MoE block of `model` (a path with a `router`) whose experts the
  checkpoint lacks but whose dense MLP (same path) it has.
  """
  copies = {}
  blocks = [k[:-len("/router")] for k in model if k.endswith("/router")]
  for i, block in enumerate(blocks):
    dense = {k: v for k, v in _nested(source, block).items()
             if k not in ("router", "layers", "adapters")}
    if not dense or any(k.startswith(block + "/layers/") for k in source):
      continue
    moe = dict(router=model[f"{block}/router"],
               layers=_nested(model, f"{block}/layers"))
    key = jax.random.fold_in(jax.random.key(seed), i) if noise_std else None
    experts = upcycle.upcycle_mlp(dense, moe, noise_std=noise_std, key=key)
    copies.update({f"{block}/layers/{k}": v for k, v in
                   flatten_by_path(experts["layers"]).items()})
  return copies


def load_partial(path: str, state, abstract_state, *,
                 upcycle_noise_std: float = 0.0, seed: int = 0):
  """Returns `state` with params/frozen replaced where the checkpoint has them.

  `abstract_state` gives the target shardings. Shapes that differ are an
  error: silently re-initialising a mismatched layer hides config mistakes.
  Experts of MoE blocks that replace a dense MLP of the checkpoint are
  upcycled from it (see module docstring).
  """
  step_dir = resolve_step_dir(path)
  source = read_parameters(step_dir)
  model = {**flatten_by_path(state.params), **flatten_by_path(state.frozen)}
  upcycled = upcycled_experts(source, model, noise_std=upcycle_noise_std,
                              seed=seed)
  if upcycled:
    log_lib.print_line(f"Upcycled {len(upcycled)} expert arrays from dense "
                       "MLPs of the checkpoint.")
  source.update(upcycled)

  loaded, fresh = [], []

  def merge_group(current, abstract):
    flat_current = flatten_by_path(current)
    flat_abstract = flatten_by_path(abstract)
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
