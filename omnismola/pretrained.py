"""`from_pretrained(DIR)`: a model with its weights, from a converted
checkpoint or a training workdir, for notebooks and scripts.

  model = omnismola.from_pretrained("/ckpt/paligemma-3b-pt-224")
  logits = model(image, text, mask_ar, mask_input)   # [B, L, vocab]

The directory's saved config says what to build; the checkpoint's
parameters fill it. Only the arrays the checkpoint lacks (adapters of other
`experts`) are initialised, so a 3B backbone never exists twice in memory.
"""
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from omnismola import build
from omnismola import storage
from omnismola.models import stack
from omnismola.train import init as init_lib


def read_config(step_dir: str) -> dict:
  """The config saved with a checkpoint step (a plain dict)."""
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      storage.path(step_dir) / "config")


def from_pretrained(directory: str, *, experts=None, dtype=None,
                    rng: int = 0) -> nnx.Module:
  """The VLM saved in `directory` (a workdir, checkpoints dir or step dir),
  with `experts` (a `config.experts` list) unless None, parameters cast to
  `dtype` unless None (float32), and the adapters the checkpoint lacks
  initialised at seed `rng`; any other missing parameter is an error."""
  step_dir = init_lib.resolve_step_dir(directory)
  saved = read_config(step_dir)
  config = ml_collections.ConfigDict(dict(
      model=saved["model"],
      experts=list(saved["experts"] if experts is None else experts)))

  abstract = nnx.eval_shape(lambda: build.build_model(config, rng))
  graphdef, abstract_state = nnx.split(abstract)
  pure = nnx.to_pure_dict(abstract_state)
  wanted = init_lib.flatten_by_path(pure)  # In the tree's leaf order.
  # Stacked layers re-split as the model's towers are (models/stack.py).
  source = stack.restack(init_lib.read_parameters(step_dir), wanted)

  missing = sorted(set(wanted) - set(source))
  not_adapters = [k for k in missing if "/adapters/" not in k]
  if not_adapters:
    raise ValueError(f"{step_dir} lacks parameters of the model it describes:"
                     f" {not_adapters[:8]}")
  fresh = _initialise_only(config, rng, missing) if missing else {}

  def value(key, target):
    array = fresh[key] if key in fresh else source[key]
    if tuple(array.shape) != tuple(target.shape):
      raise ValueError(f"{step_dir}: {key} has shape {tuple(array.shape)}, "
                       f"the model wants {tuple(target.shape)}.")
    return np.asarray(array, dtype or target.dtype)

  filled = jax.tree_util.tree_unflatten(
      jax.tree.structure(pure),
      [value(key, target) for key, target in wanted.items()])
  nnx.replace_by_pure_dict(abstract_state, filled)
  return nnx.merge(graphdef, abstract_state)


def _initialise_only(config, rng: int, keys: list[str]) -> dict:
  """Fresh values of `keys`; jit drops every other parameter's init."""

  @jax.jit
  def init():
    state = nnx.to_pure_dict(nnx.state(build.build_model(config, rng)))
    flat = init_lib.flatten_by_path(state)
    return {k: flat[k] for k in keys}

  return jax.device_get(init())
