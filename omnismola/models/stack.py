"""Stacks of identical layers: one module with a leading layer axis, run by scan.

A tower of `depth` layers is created once under `nnx.vmap`, so every
parameter gets a leading `layers` axis, and applied with `nnx.scan`, so the
compiled program holds one layer body whatever the depth (compile time stays
flat from 2 to 24 layers and beyond; tests/test_models.py measures it).

Expert configs still address single layers: a linear layer or MLP block of
a stack at `decoder/layers` lives at `decoder/layers/attn/q` but matches its
`targets` regex as `decoder/layers/0/attn/q`, ...,
`decoder/layers/{depth-1}/attn/q` (see `stacked_factory`). A stack is
homogeneous, so a regex must match all of its layers or none.

Layers return their auxiliary outputs (routers' losses and statistics, a
dict {module path: aux}); `scan_stack` stacks them along the layer axis, so
`decoder/layers/mlp`'s balance loss comes back as [depth].

Rematerialisation trades compute for memory per layer; the policy is a
config field (`model.remat_policy`).
"""
from typing import Any, Callable

import jax
from flax import nnx


# Name -> what the backward pass may keep of a layer's forward pass.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # No remat: keep every activation (fastest, most memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

LAYER_AXIS = "layers"


def check_remat_policy(name: str) -> None:
  if name not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {name!r}; choose one of "
                     f"{sorted(REMAT_POLICIES)}.")


def stacked_factory(make: Callable[..., nnx.Module], prefix: str,
                    depth: int) -> Callable[..., nnx.Module]:
  """A module factory (LinearFactory, MlpFactory) for the layer of a stack.

  `make(path, ...)` is called with `match_paths`, the module's path as seen
  in each of the stack's `depth` layers at `prefix`.
  """

  def make_stacked(path: str, *args, **kwargs):
    if not path.startswith(prefix + "/"):
      raise ValueError(f"{path} is not inside the stack {prefix}.")
    suffix = path[len(prefix):]
    match_paths = tuple(f"{prefix}/{i}{suffix}" for i in range(depth))
    return make(path, *args, match_paths=match_paths, **kwargs)

  return make_stacked


def create_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """`depth` independently initialised layers as one stacked module."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make_layer(rngs)

  stack = create(rngs)
  for _, node in nnx.iter_graph(stack):
    if isinstance(node, nnx.Param):
      axes = node.get_metadata().get("logical_axes")
      if axes is not None:
        node.set_metadata("logical_axes", (LAYER_AXIS,) + tuple(axes))
  return stack


def create_tower_layers(layer_cls, prefix: str, config, *, make_linear,
                        make_mlp, rngs: nnx.Rngs) -> nnx.Module:
  """The `config.depth` layers of a tower, `layer_cls(prefix, config, ...)`,
  stacked, with their linears and MLPs matching per layer (see above)."""
  in_stack = lambda make: stacked_factory(make, prefix, config.depth)
  return create_stack(
      lambda rngs: layer_cls(prefix, config, make_linear=in_stack(make_linear),
                             make_mlp=in_stack(make_mlp), rngs=rngs),
      config.depth, rngs)


def scan_stack(stack: nnx.Module, body: Callable, carry, xs, *,
               remat_policy: str = "none"):
  """Runs `carry, y, aux = body(layer, carry, x)` over the layers of `stack`.

  Args:
    stack: a module from `create_stack`.
    body: one layer's step; `x` is layer i's slice of `xs`, `aux` the
      layer's auxiliary outputs ({module path: aux}, {} for none).
    carry: what flows from layer to layer (the residual stream).
    xs: a pytree of per-layer inputs with a leading layer axis (e.g. a KV
      cache, or which layers use a sliding window); () for none.
    remat_policy: a key of REMAT_POLICIES.

  Returns:
    (final carry, ys, aux), ys and every aux leaf stacked along a leading
    layer axis.
  """
  check_remat_policy(remat_policy)
  policy = REMAT_POLICIES[remat_policy]
  # A plain lax.scan over the split state rather than nnx.scan: callers run
  # stacks inside their own loops (decoding's while_loop) under traces the
  # module was not created in, which NNX's transforms refuse. Layers are
  # therefore stateless in the forward pass (no mutated variables).
  graphdef, state = nnx.split(stack)

  def apply(layer_state, carry, x):
    carry, y, aux = body(nnx.merge(graphdef, layer_state), carry, x)
    return carry, (y, aux)

  if policy is not None:
    apply = jax.checkpoint(apply, policy=policy, prevent_cse=False)
  carry, (ys, aux) = jax.lax.scan(
      lambda carry, xs: apply(xs[0], carry, xs[1]), carry, (state, xs))
  return carry, ys, aux
