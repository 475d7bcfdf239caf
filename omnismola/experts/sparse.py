"""Sparse top-k mixture of full-MLP experts (V-MoE, VL-MoE, CuMo).

Each token picks k experts by its router's softmax and gets
y_t = sum_c g_tc MLP_{e_tc}(x_t), the gates g renormalised over the k chosen
experts by default (CuMo). Experts have the backbone MLP's shape (GeGLU for
the decoder, GELU with biases for the ViT), so they can be upcycled from it.

Experts come in pools. By default one pool serves every valid token. With
`pools=dict(image=n, text=m)` (VL-MoE) image tokens are routed only among the
image experts and text tokens only among the text experts: one router
kernel, softmax restricted to the token's pool, which is the same as a
separate router per pool. All experts live in one [E, ...] array (pools are
consecutive ranges, in sorted pool order) so one dispatch serves every pool
and the `expert` logical axis shards them all.

Dispatch (dispatch.py): `capacity`, or `dropless`, which is `ragged` on
GPU/TPU and `blocked` on CPU, where XLA's ragged_dot is slow.

The router reports its auxiliary losses and statistics as `routing`, a
`MoEAux` (`layers.report`), so scanned layers can stack them and the
trainer can weight each loss once. Padding never routes and never counts.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnismola.experts import dispatch as dispatch_lib
from omnismola.experts import routing
from omnismola.experts.kind import BLOCK, Kind
from omnismola.models import layers
from omnismola.models.layers import Dense, TokenInfo, record_usage

DISPATCHES = ("capacity", "dropless", "ragged", "blocked")


@flax.struct.dataclass
class MoEAux:
  """Auxiliary losses and routing statistics of one sparse MoE call.

  Attributes:
    balance_loss: Switch/GShard load balance, 1 at perfect balance; with
      several pools, their losses weighted by their share of tokens.
    z_loss: mean over routed tokens of logsumexp(pool logits)^2.
    tokens_per_expert: float [E], token copies each expert was chosen for
      (before any capacity drop).
    max_violation: max over experts of load / (mean load of its pool) - 1.
    router_entropy: mean entropy of the routed tokens' router softmax.
    dropped_fraction: share of routed token copies dropped for capacity.
  """
  balance_loss: jax.Array
  z_loss: jax.Array
  tokens_per_expert: jax.Array
  max_violation: jax.Array
  router_entropy: jax.Array
  dropped_fraction: jax.Array


def pool_of_tokens(tokens: TokenInfo, pool_names) -> jax.Array:
  """int [B, T]: index into `pool_names` of the pool serving each token, or
  -1 (padding, or a modality no pool serves)."""
  index = jnp.full(tokens.valid.shape, -1, jnp.int32)
  for i, name in enumerate(pool_names):
    index = jnp.where(routing.modality_tokens(tokens, name), i, index)
  return index


def top_k_gates(probs: jax.Array, top_k: int, renormalize: bool):
  """(gates [..., k], experts int [..., k]): the k largest probabilities,
  divided by their sum when `renormalize` (so they always sum to 1)."""
  gates, experts = jax.lax.top_k(probs, top_k)
  if renormalize:
    total = jnp.sum(gates, axis=-1, keepdims=True)
    gates = gates / jnp.where(total > 0, total, 1.0)
  return gates, experts


def routing_aux(logits: jax.Array, probs: jax.Array, experts: jax.Array,
                routed: jax.Array, allowed: jax.Array, pool_size: jax.Array,
                kept: jax.Array) -> MoEAux:
  """Losses and statistics of one routing decision (see MoEAux).

  The load balance loss is sum_pools (n_p / n) * E_p * sum_{e in p} f_e P_e,
  with f_e the share of pool p's routed token copies (all k choices) sent
  to e, P_e the mean router probability of e over pool p's routed tokens,
  n_p the routed tokens of pool p, n those of all pools, and E_p the
  experts in pool p. One pool gives Switch's E * sum_e f_e P_e; a pool
  absent from the batch contributes 0. The z-loss (ST-MoE) keeps router
  logits small, where bfloat16 rounding is harmless.

  Takes the router's `logits` and `probs` [..., E] (softmax within the pool,
  0 outside it), the chosen `experts` int [..., k], `routed` bool [...]
  (tokens routed at all), `allowed` bool [..., E] (the experts of each
  token's pool), `pool_size` [E] (experts in each expert's pool) and `kept`
  bool [..., k] (copies that reached their expert).
  """
  axes = tuple(range(routed.ndim))
  top_k = experts.shape[-1]
  # Per expert [E]: the routed token copies choosing it, the routed tokens
  # of its pool, and its router probability summed over them.
  counts = jnp.sum(jax.nn.one_hot(experts, pool_size.shape[0]) *
                   routed[..., None, None], axis=tuple(range(experts.ndim)))
  pool_tokens = jnp.sum(allowed & routed[..., None], axis=axes)
  prob_sum = jnp.sum(probs * routed[..., None], axis=axes)
  balance = jnp.sum(pool_size * counts * prob_sum / (
      top_k * jnp.maximum(jnp.sum(routed), 1) * jnp.maximum(pool_tokens, 1)))
  lse = jax.nn.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  mean_load = pool_tokens * top_k / pool_size
  violation = jnp.where(mean_load > 0,
                        counts / jnp.maximum(mean_load, 1e-9) - 1, -1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), -1)
  copies = jnp.maximum(jnp.sum(routed) * top_k, 1)
  return MoEAux(
      balance_loss=balance,
      z_loss=_mean(jnp.square(lse), routed),
      tokens_per_expert=counts,
      max_violation=jnp.maximum(jnp.max(violation), 0.0),
      router_entropy=_mean(entropy, routed),
      dropped_fraction=1.0 - jnp.sum(kept & routed[..., None]) / copies)


def _mean(values, mask):
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def expert_mlp(weights: dict, activation: str, h: jax.Array,
               linear: dispatch_lib.GroupedLinear) -> jax.Array:
  """Every expert's MLP, with the layer shapes of the backbone's MLP, on
  rows `h` in the layout of the dispatch's grouped map `linear`.

  `weights`: layer name -> (kernel [E, in, out], bias [E, out] or None).
  """
  layer = lambda name, h: linear(h, *weights[name])
  if activation == "geglu":
    return layer("down", layers.gelu(layer("gate", h)) * layer("up", h))
  return layer("fc2", layers.gelu(layer("fc1", h)))


def dense_linear(h: jax.Array, kernel: jax.Array,
                 bias: jax.Array | None) -> jax.Array:
  """One linear map on every row: `expert_mlp`'s `linear` for a dense MLP."""
  y = h.astype(kernel.dtype) @ kernel
  return y if bias is None else y + bias


def layer_shapes(activation: str, width: int, mlp_dim: int,
                 out_features: int) -> dict[str, tuple]:
  """{layer name: (in, out, logical axes, use_bias)} of the dense MLP block
  of `activation` (models/layers.py's MLPS), which the experts mirror."""
  block = nnx.eval_shape(lambda: layers.MLPS[activation](
      width, mlp_dim, out_features=out_features, rngs=nnx.Rngs(0)))
  return {name: (dense.in_features, dense.out_features, dense.axes,
                 dense.bias is not None)
          for name, dense in nnx.iter_children(block)
          if isinstance(dense, Dense)}


def linear_weights(layer) -> tuple[jax.Array, jax.Array | None]:
  """(kernel, bias or None) of an `ExpertLinear` or a `Dense`."""
  return layer.kernel[...], None if layer.bias is None else layer.bias[...]


def resolve_dispatch(name: str) -> str:
  """"dropless" is ragged_dot on GPU/TPU and the blocked einsum on CPU."""
  if name not in DISPATCHES:
    raise ValueError(f"Unknown sparse MoE dispatch {name!r}; expected one "
                     f"of {DISPATCHES}.")
  if name == "dropless":
    return "blocked" if jax.default_backend() == "cpu" else "ragged"
  return name


def default_tile(copies: int, num_experts: int) -> int:
  """Rows per tile of the blocked dispatch: about an expert's mean load,
  a multiple of 8, at most 128. Smaller tiles waste fewer padding rows but
  gather the expert weights more times."""
  mean_load = -(-copies // num_experts)
  return min(128, -(-mean_load // 8) * 8)


class ExpertLinear(nnx.Module):
  """E independent linear maps: kernel [E, in, out] (+ bias [E, out]).

  Laid out like the backbone's Dense with a leading `expert` axis, so
  upcycling copies the dense kernel into every expert.
  """

  def __init__(self, num_experts: int, in_features: int, out_features: int,
               *, axes, use_bias: bool, rngs: nnx.Rngs):
    init = jax.nn.initializers.lecun_normal(in_axis=-2, out_axis=-1,
                                            batch_axis=(0,))
    self.kernel = nnx.Param(
        init(rngs.params(), (num_experts, in_features, out_features)),
        logical_axes=("expert",) + tuple(axes))
    self.bias = (nnx.Param(jnp.zeros((num_experts, out_features)),
                           logical_axes=("expert", axes[1]))
                 if use_bias else None)


class SparseMoE(nnx.Module):
  """Top-k routed MLP experts: `y = moe(x [B, T, width], tokens)`; the
  router reports its losses and statistics as `routing` (a `MoEAux`).

  Built by `experts/attach.py` in place of a backbone MLP block (a
  `sparse_moe` entry of `config.experts`), with the block's widths and
  activation. docs/experts.md describes the options.

  y is the mixture's output only (no residual): a dropped or unrouted token
  gets 0 and is carried by the residual connection around the MLP.

  Args:
    width, mlp_dim: the MLP's model and hidden widths.
    num_experts: experts of the single shared pool; or give `pools`:
      dict(all=n) or dict(image=n, text=m) (either may be absent; its
      tokens then get no expert, see `dense_fallback`).
    capacity_factor: capacity dispatch only; each expert has
      ceil(capacity_factor * T * top_k / E_pool) slots per sequence.
    tile: rows per tile of the blocked dispatch; None picks default_tile.
    out_features: output width (default `width`; the `mlp` connector maps
      to the decoder's width).
    causal: some tokens attend causally (the decoder), so no token's output
      may depend on another token, and capacity dispatch is refused.
    dense_fallback: tokens no pool serves (those of a modality without a
      pool, and padding) go through a dense MLP instead of getting 0. Its
      layers live where the dense block's do (`<block>/gate/kernel`, ...),
      so a dense checkpoint loads into them; it runs on every token, its
      output kept where no expert is.
  """

  def __init__(self, width: int, mlp_dim: int, *,
               num_experts: int | None = None,
               pools: dict[str, int] | None = None, top_k: int = 2,
               capacity_factor: float = 1.25, dispatch: str = "dropless",
               activation: str = "geglu", renormalize: bool = True,
               batch_priority: bool = False, tile: int | None = None,
               out_features: int | None = None, causal: bool = False,
               dense_fallback: bool = False, rngs: nnx.Rngs):
    if (num_experts is None) == (pools is None):
      raise ValueError("Give exactly one of num_experts (one shared "
                       "pool) and pools (e.g. dict(image=8, text=8)).")
    pools = dict(all=num_experts) if pools is None else dict(pools)
    unknown = sorted(set(pools) - set(routing.MODALITIES))
    if unknown or ("all" in pools and len(pools) > 1):
      raise ValueError(f"pools must be dict(all=n) or keyed by "
                       f"'image'/'text', got {pools}.")
    if any(n < top_k for n in pools.values()) or top_k < 1:
      raise ValueError(f"Every pool needs at least top_k={top_k} >= 1 "
                       f"experts, got {pools}.")
    if activation not in layers.MLPS:
      raise ValueError(f"Unknown activation {activation!r}; expected "
                       f"one of {sorted(layers.MLPS)}.")
    if dense_fallback and set(pools) not in ({"image"}, {"text"}):
      raise ValueError(f"dense_fallback serves the modality without "
                       f"a pool; pools {pools} leave none (give "
                       "dict(image=n) or dict(text=m)).")
    if resolve_dispatch(dispatch) == "capacity" and causal:  # Checks typos.
      raise ValueError(
          "dispatch='capacity' is not causal (tokens of a sequence "
          "compete for expert slots, so later tokens change earlier ones' "
          "outputs, and cached decoding differs from training); use "
          "dispatch='dropless' for blocks with causal tokens.")
    self.pool_names = tuple(sorted(pools))
    sizes = [pools[name] for name in self.pool_names]
    self.num_experts = sum(sizes)
    # Static per-expert facts: its pool's index and its pool's size.
    self.expert_pool = tuple(int(i) for i in np.repeat(range(len(sizes)),
                                                       sizes))
    self.pool_size = tuple(int(n) for n in np.repeat(sizes, sizes))
    self.top_k = top_k
    self.capacity_factor = capacity_factor
    self.dispatch = dispatch
    self.activation = activation
    self.renormalize = renormalize
    self.batch_priority = batch_priority
    self.tile = tile
    init = jax.nn.initializers.lecun_normal()
    self.router = nnx.Param(init(rngs.params(), (width, self.num_experts)),
                            logical_axes=("embed", "expert"))
    shapes = layer_shapes(activation, width, mlp_dim, out_features or width)
    self.layers = nnx.Dict({
        name: ExpertLinear(self.num_experts, d_in, d_out, axes=axes,
                           use_bias=use_bias, rngs=rngs)
        for name, (d_in, d_out, axes, use_bias) in shapes.items()})
    # Attributes named as the dense block's layers, so their parameters
    # have its paths and a dense checkpoint loads into them.
    self.dense_layers = tuple(shapes) if dense_fallback else ()
    for name in self.dense_layers:
      d_in, d_out, axes, use_bias = shapes[name]
      setattr(self, name, Dense(d_in, d_out, axes=axes,
                                use_bias=use_bias, rngs=rngs))

  def __call__(self, x: jax.Array, tokens: TokenInfo):
    token_pool = pool_of_tokens(tokens, self.pool_names)
    routed = token_pool >= 0
    # Unrouted tokens route in pool 0 and are masked out below: no row is
    # ever all -inf, so no NaN reaches the gradients.
    allowed = (jnp.maximum(token_pool, 0)[..., None] ==
               jnp.asarray(self.expert_pool))
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32),
                        self.router[...].astype(jnp.float32))
    probs = routing.masked_softmax(logits, allowed, axis=-1)
    gates, experts = top_k_gates(probs, self.top_k, self.renormalize)
    gates = gates * routed[..., None]
    # Each token's gate mass on each expert, before any capacity drop.
    record_usage(self, jnp.sum(jax.nn.one_hot(experts, self.num_experts) *
                               gates[..., None], axis=-2))
    expert_fn = functools.partial(
        expert_mlp, {name: linear_weights(layer) for name, layer in
                     self.layers.items()}, self.activation)
    y, kept = self._dispatch(x, experts, gates, routed, expert_fn)
    if self.dense_layers:
      dense = expert_mlp({name: linear_weights(getattr(self, name))
                          for name in self.dense_layers},
                         self.activation, x, dense_linear)
      y = jnp.where(routed[..., None], y, dense)
    probs = probs * routed[..., None]
    layers.report(self, "routing", routing_aux(
        logits, probs, experts, routed, allowed,
        jnp.asarray(self.pool_size, jnp.float32), kept))
    return y.astype(x.dtype)

  def _dispatch(self, x, experts, gates, routed, expert_fn):
    """(y, kept): capacity dispatch with each sequence as one routing
    group, or dropless dispatch over all B * T tokens at once."""
    kind = resolve_dispatch(self.dispatch)
    batch, length, _ = x.shape
    if kind == "capacity":
      slots = [dispatch_lib.capacity(self.capacity_factor, length,
                                     self.top_k, n) for n in self.pool_size]
      return dispatch_lib.capacity_dispatch(
          x, experts, gates, routed,
          expert_capacity=jnp.asarray(slots, jnp.int32), slots=max(slots),
          expert_fn=expert_fn,
          priority=gates[..., 0] if self.batch_priority else None)
    flat = lambda a: a.reshape(batch * length, *a.shape[2:])
    args = (flat(x), flat(experts), flat(gates), flat(routed))
    if kind == "ragged":
      y = dispatch_lib.ragged_dispatch(*args, num_experts=self.num_experts,
                                       expert_fn=expert_fn)
    else:
      tile = self.tile or default_tile(experts.size, self.num_experts)
      y = dispatch_lib.blocked_dispatch(*args, num_experts=self.num_experts,
                                        tile=tile, expert_fn=expert_fn)
    return y.reshape(batch, length, -1), jnp.ones(experts.shape, bool)


KIND = Kind("sparse_moe", SparseMoE, (BLOCK,), replaces=True)
