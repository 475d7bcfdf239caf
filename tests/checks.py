"""Helpers shared by the model, expert and trainer tests: loop-reference
assertions, a module with experts attached, running a module with given
parameters, a next-token loss, comparing two train steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from omnismola.experts import attach
from omnismola.models import layers


def assert_values_and_grads_close(fused, reference, params, x, *,
                                  tol: float = 1e-4) -> None:
  """fused(params, x) == reference(params, x), and so are their gradients
  with respect to both arguments."""
  np.testing.assert_allclose(fused(params, x), reference(params, x),
                             rtol=tol, atol=tol)
  got = jax.grad(fused, argnums=(0, 1))(params, x)
  want = jax.grad(reference, argnums=(0, 1))(params, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


def with_experts(entries, make, *, path: str = "blk/q",
                 instance_features: int | None = None, seed: int = 0):
  """The module `make(rngs)` as built at `path` of a holder module, with
  the experts `entries` (a `config.experts` list) attach there, planned as
  for a model (experts/attach.py)."""
  holder = node = nnx.Module()
  *parents, name = path.split("/")
  for parent in parents:
    setattr(node, parent, nnx.Module())
    node = getattr(node, parent)
  setattr(node, name, make(nnx.Rngs(seed)))
  plan = attach.make_plan(entries, holder, instance_features=instance_features)
  plan.attach(holder, "", nnx.Rngs(seed))
  return getattr(node, name)  # A replacement is a new module.


def linear(in_features: int, out_features: int, *, axes=(None, None),
           use_bias: bool = False):
  """`make` for `with_experts`: a Dense layer."""
  return lambda rngs: layers.Dense(in_features, out_features, axes=axes,
                                   use_bias=use_bias, rngs=rngs)


def randomized(module, *, seed: int = 1, scale: float = 0.5,
               where=lambda path: True):
  """The module with its floating-point parameters at `where`(path) drawn
  at random (normal times `scale`): B matrices included, so adapters
  contribute."""
  graphdef, state = nnx.split(module)
  flat = nnx.to_flat_state(state)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for key, (path, variable) in zip(keys, flat):
    if (jnp.issubdtype(variable.get_value().dtype, jnp.floating) and
        where("/".join(map(str, path)))):
      variable.set_value(scale * jax.random.normal(key, variable.shape))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def assert_matches_reference(module, reference, tokens, *, in_features: int,
                             out_features: int) -> jax.Array:
  """module(x, tokens) == reference(params, x) on random x, values and
  gradients (through a random projection of the output). Returns x."""
  batch, length = tokens.valid.shape
  x = jax.random.normal(jax.random.key(2), (batch, length, in_features))
  w = jax.random.normal(jax.random.key(3), (batch, length, out_features))
  graphdef, state = nnx.split(module)
  assert_values_and_grads_close(
      lambda params, x: jnp.sum(
          apply_with(graphdef, state, params, x, tokens) * w),
      lambda params, x: jnp.sum(reference(params, x) * w),
      nnx.to_pure_dict(state), x)
  return x


def apply_with(graphdef, state, params, *args):
  """The module (graphdef, state) with `params` (a pure dict, e.g. being
  differentiated) in place of its parameters, called on `args`."""
  return apply_reporting(graphdef, state, params, *args)[0]


def apply_reporting(graphdef, state, params, *args):
  """(output, reports) of `apply_with`: what the module's routers reported
  ({router path relative to the module: {name: value}},
  `layers.pop_reports`)."""
  filled = jax.tree.map(lambda v: v, state)
  nnx.replace_by_pure_dict(filled, params)
  module = nnx.merge(graphdef, filled)
  return module(*args), layers.pop_reports(module)


def next_token_loss(model, batch):
  """Mean next-token cross-entropy of a VLM over the suffix (mask_ar 1)."""
  logits = model(batch["image"], batch["text"], batch["mask_ar"],
                 batch["mask_input"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                        batch["text"][:, 1:])
  weights = batch["mask_ar"][:, 1:]
  return jnp.sum(nll * weights) / jnp.sum(weights)


def assert_steps_match(first, second, *, rtol: float, atol: float) -> None:
  """Two train steps' (new state, metrics) from one state agree: loss,
  per-task sums and updated parameters (to rtol / atol), target counts
  exactly."""
  (state_a, metrics_a), (state_b, metrics_b) = first, second
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=rtol)
  np.testing.assert_allclose(metrics_a["task_nll"], metrics_b["task_nll"],
                             rtol=10 * rtol)
  np.testing.assert_array_equal(metrics_a["task_tokens"],
                                metrics_b["task_tokens"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol),
               state_a.params, state_b.params)
