"""Partial initialisation from another run's (or a converted) checkpoint.

Parameters whose path and shape match are loaded; the rest (new experts,
routers) keep their fresh initialisation, and optimizer state and step start
anew: a new stage of a multi-stage recipe (docs/training.md, "Partial
initialisation"). Experts that replace a dense MLP or a LoRA of the
checkpoint (CuMo's co-upcycling, Awaker2.5-VL's stage II) start as copies of
it (`experts/upcycle.py`) unless `init.upcycle=False`.
"""
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from omnismola import build
from omnismola import errors
from omnismola import storage
from omnismola.experts import upcycle
from omnismola.models import stack
from omnismola.train import logging as log_lib
from omnismola.train import optim


def flatten_by_path(tree) -> dict[str, object]:
  return {optim.key_path_str(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def resolve_step_dir(location: str) -> epath.Path:
  """A step directory from a workdir, a checkpoints dir or a step dir.

  Of a checkpoints dir, the newest step Orbax finished writing (in a bucket
  a step's folder exists from the write's start).
  """
  path = storage.path(location)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "state").is_dir():
    return path
  steps = [int(step.name) for step in path.iterdir()
           if step.name.isdigit() and ocp.step.is_path_finalized(step)] \
      if path.is_dir() else []
  if not steps:
    raise FileNotFoundError(
        f"config.init.checkpoint={os.fspath(path)!r}: no checkpoint found "
        "(expected a workdir, its checkpoints/ directory or one step "
        "directory).")
  return path / str(max(steps))


def find_step_dir(location) -> epath.Path | None:
  """resolve_step_dir(location), or None where it holds no checkpoint."""
  try:
    return resolve_step_dir(location)
  except FileNotFoundError:
    return None


def agree_with_checkpoint(config, checkpoint: str | None = None) -> None:
  """Makes config.model agree with `checkpoint`'s saved model (default:
  config.init.checkpoint, if set), in place: the decoder's vocab_size becomes
  the checkpoint's; another shape that differs is an InputError naming the
  fields (build.agree_with_checkpoint)."""
  checkpoint = checkpoint or config.init.checkpoint
  if not checkpoint:
    return
  from omnismola import pretrained  # pylint: disable=g-import-not-at-top
  try:
    step_dir = resolve_step_dir(checkpoint)
  except FileNotFoundError as e:
    raise errors.InputError(str(e)) from None
  saved = pretrained.read_config(step_dir)["model"]
  try:
    fields, notes = build.agree_with_checkpoint(config.model.to_dict(), saved)
  except ValueError as e:
    raise errors.InputError(
        f"config.init.checkpoint={os.fspath(step_dir)!r}: {e}") from None
  config.model.decoder.vocab_size = fields["decoder"]["vocab_size"]
  for note in notes:
    log_lib.print_line(note)


def read_parameters(step_dir: str, under: str = "") -> dict[str, np.ndarray]:
  """{path: array} of a checkpoint step's parameters, trained and frozen.

  Into host memory, and nothing else: not the optimizer state, and with
  `under` (a subtree such as "vit") only the parameters below it.
  """
  directory = storage.path(step_dir) / "state"
  saved = ocp.PyTreeCheckpointHandler().metadata(directory).tree
  wanted = {group: _subtree(saved[group], under)
            for group in ("params", "frozen") if group in saved}
  wanted = {group: tree for group, tree in wanted.items() if tree}
  if not wanted:
    return {}
  restored = ocp.PyTreeCheckpointer().restore(
      directory, args=ocp.args.PyTreeRestore(
          item=wanted, partial_restore=True,
          restore_args=jax.tree.map(
              lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)))
  return {path: array for tree in restored.values()
          for path, array in flatten_by_path(tree).items()}


def _subtree(tree: dict, under: str, path: str = "") -> dict:
  """The leaves of a nested dict at or below path `under` ("" for all)."""
  kept = {}
  for name, node in tree.items():
    node_path = f"{path}/{name}" if path else str(name)
    if isinstance(node, dict):
      node = _subtree(node, under, node_path)
      if node:
        kept[name] = node
    elif not under or node_path == under or node_path.startswith(under + "/"):
      kept[name] = node
  return kept


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
  """Flat {path: array} of expert weights copied from dense MLPs in `source`,
  for every MoE block of `model` (a path with a `router`) whose experts the
  checkpoint lacks but whose dense MLP (same path) it has."""
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


def upcycled_lora_experts(source: dict, model: dict, *,
                           noise_std: float = 0.0, seed: int = 0) -> dict:
  """Flat {path: array} of sparse_lora experts copied from LoRAs in `source`.

  For every `<layer>/adapters/sparse_lora_<i>` of `model` whose experts the
  checkpoint lacks but where it has a `<layer>/adapters/lora_<j>` that
  `model` does not; and where the checkpoint has a one-expert sparse_lora at
  the same path and `model` more experts (MoME's stage 2; the router starts
  fresh, the learned scale loads).
  """
  copies = {}
  adapters = sorted(
      k[:-len("/experts/a")] for k in model
      if re.fullmatch(r".*/adapters/sparse_lora_\d+/experts/a", k))
  for i, adapter in enumerate(adapters):
    single = f"{adapter}/experts/a" in source
    if single:
      if (source[f"{adapter}/experts/a"].shape[-3] != 1 or
          model[f"{adapter}/experts/a"].shape[-3] == 1):
        continue
      lora = {name: source[f"{adapter}/experts/{name}"][..., 0, :, :]
              for name in ("a", "b")}
    else:
      layer = adapter.rpartition("/adapters/")[0]
      loras = sorted(
          k[len(layer) + 1:-len("/a")] for k in source
          if re.fullmatch(re.escape(layer) + r"/adapters/lora_\d+/a", k)
          and k not in model)
      if not loras:
        continue
      if len(loras) > 1:
        raise ValueError(f"init.checkpoint has several LoRAs at {layer} "
                         f"({loras}) this model lacks; which one to copy "
                         f"into {adapter} is ambiguous.")
      lora = _nested(source, f"{layer}/{loras[0]}")
    key = jax.random.fold_in(jax.random.key(seed), i) if noise_std else None
    experts = upcycle.upcycle_lora(lora, _nested(model, adapter),
                                   noise_std=noise_std, key=key)
    copies.update({f"{adapter}/{k}": v for k, v in
                   flatten_by_path(experts).items()
                   if k.startswith(("experts/", "global_expert/") +
                                   (("router/",) if single else ()))})
  return copies


def _shape_mismatch(sources: str, key: str, there, here) -> str:
  """The message for parameter `key` of other shapes in the checkpoint."""
  if key == "decoder/embedder/embedding":
    return (f"config.model.decoder.vocab_size={here[0]} but the checkpoint's "
            f"embedding has {there[0]} rows (init.checkpoint {sources}).")
  return (f"init.checkpoint {sources}: {key} has shape {tuple(there)} there "
          f"but {tuple(here)} in this model (config.model must describe the "
          "checkpoint's model).")


def read_part(model_subtree: str, checkpoint: str,
              checkpoint_subtree: str) -> dict[str, object]:
  """{path: array} of `checkpoint`'s parameters under `checkpoint_subtree`,
  moved under `model_subtree` (an `init.parts` entry)."""
  step_dir = resolve_step_dir(checkpoint)
  prefix = checkpoint_subtree.rstrip("/") + "/"
  part = {model_subtree.rstrip("/") + "/" + key[len(prefix):]: value
          for key, value in read_parameters(step_dir, prefix[:-1]).items()
          if key.startswith(prefix)}
  if not part:
    raise ValueError(f"init.parts: checkpoint {step_dir} has no parameter "
                     f"under {checkpoint_subtree!r}.")
  return part


def load_partial(path: str, state, abstract_state, *, parts=(),
                 upcycle: bool = True, upcycle_noise_std: float = 0.0,
                 seed: int = 0):
  """`state` with params/frozen replaced where the checkpoints have them.

  `path` (may be empty) is loaded first, then every `parts` entry, which
  takes precedence, placed with `abstract_state`'s shardings. Shapes that
  differ are an error: re-initialising a mismatched layer hides mistakes.
  """
  step_dir = resolve_step_dir(path) if path else None
  sources = ", ".join(([os.fspath(step_dir)] if step_dir else []) +
                      [checkpoint for _, checkpoint, _ in parts])
  model = {**flatten_by_path(state.params), **flatten_by_path(state.frozen)}
  source = read_parameters(step_dir) if step_dir else {}
  for part in parts:
    source.update(read_part(*part))
  # Stacked layers re-split as this model's towers are (a dense checkpoint's
  # `decoder/layers/...` into `decoder/layers_0_4/...`, models/stack.py).
  source = stack.restack(source, model)
  upcycled = {
      **upcycled_experts(source, model, noise_std=upcycle_noise_std,
                         seed=seed),
      **upcycled_lora_experts(source, model, noise_std=upcycle_noise_std,
                              seed=seed)}
  if upcycle:
    source.update(upcycled)
  else:
    # The checkpoint may hold other-shaped arrays at those paths (a
    # one-expert sparse_lora): fresh experts must not load them either.
    for key in upcycled:
      source.pop(key, None)
  if upcycled:
    log_lib.print_line(
        f"Upcycled {len(upcycled)} expert arrays from dense MLPs and LoRAs "
        "of the checkpoint." if upcycle else
        f"init.upcycle=False: {len(upcycled)} expert arrays keep their fresh "
        "initialisation rather than copy dense MLPs and LoRAs of the "
        "checkpoint.")

  loaded, fresh = [], []

  def merge_group(current, abstract):
    flat_abstract, leaves = flatten_by_path(abstract), []
    for key, value in flatten_by_path(current).items():
      if key in source:
        if tuple(source[key].shape) != tuple(value.shape):
          raise ValueError(_shape_mismatch(sources, key, source[key].shape,
                                           value.shape))
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
    raise ValueError(f"init.checkpoint {sources} shares no parameter path "
                     "with this model.")
  log_lib.print_line(
      f"Initialised {len(loaded)} parameter arrays from {sources}; "
      f"{len(fresh)} keep their fresh initialisation.")
  logging.info("Freshly initialised: %s", fresh)
  return state
