"""Routed low-rank experts: Awaker2.5-VL's MoE of LoRAs, MoME's MoLE.

Added beside a linear layer (like `lora`) or beside a whole MLP block
(MoME: "parallel to every FFN"), with x the module's input:

  p = softmax(u W_G)        u: the example's instance vector
                            (routing="instance") or the token's x ("token")
  g_1 >= ... >= g_k         the top-k probabilities, experts e_1 ... e_k
  y = m * s * (sum_c g_c E_{e_c}(x) + (1 - g_1) G(x))
  E_j(x) = act(x A_j) B_j   act: identity (LoRA) or relu (MoME's adapter)

G is the optional always-on global expert (Awaker: G_global = 1 - G_max),
m = alpha / rank, s an optional learned scalar (MoME), and every B starts at
zero, so the wrapped module computes exactly its base at step 0. The gates
are the chosen experts' softmax probabilities, not renormalised (Awaker), so
the router learns through them. Padding gets no output.

Instance routing reads `TokenInfo.instance` (the prompt's mean embedding,
models/vlm.py): one decision per example, the same in training and at every
cached decoding step. Token routing decides per token from x alone (causal).
Both run the weighted low-rank form of smola.py: h = act(x A_cat), each
expert's rank block scaled by its weight (0 if unchosen), y = h B_cat.

With `share_gate`, the linear layers an entry matches inside one block share
the router made for the first of them in path order (`share_in_block`).
docs/experts.md says more.
"""
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.experts.kind import BLOCK, LINEAR, Kind
from omnismola.experts.lora import LowRank
from omnismola.models.layers import (Base, TokenInfo, record_usage,
                                     token_matmul)
from omnismola import flops

ROUTINGS = ("instance", "token")
ACTIVATIONS = {None: lambda h: h, "relu": jax.nn.relu}


class Router(nnx.Module):
  """Router probabilities softmax(u W_G) for u [..., features] -> [..., E]."""

  def __init__(self, features: int, num_experts: int, *, axis: str | None,
               rngs: nnx.Rngs):
    init = jax.nn.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (features, num_experts)),
                            logical_axes=(axis, "expert"))

  def __call__(self, u: jax.Array) -> jax.Array:
    # float32: routing decisions must not flip with bfloat16 rounding.
    logits = u.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def top_k_weights(probs: jax.Array, top_k: int):
  """(weight of every expert [..., E], top gate [...]) from router probs.

  The k chosen experts weigh their probabilities, the others 0.
  """
  gates, experts = jax.lax.top_k(probs, top_k)
  chosen = jax.nn.one_hot(experts, probs.shape[-1], dtype=probs.dtype)
  return jnp.einsum("...k,...ke->...e", gates, chosen), gates[..., 0]


class SparseLoRA(nnx.Module):
  """Top-k routed low-rank experts beside a module [in_features -> out].

  The options are those of the module docstring (docs/experts.md has a
  table); `share_gate` without `share_in_block` gives an own router.

  Args:
    axes: logical axes of the wrapped module's input and output.
    instance_features: the width of `TokenInfo.instance` (the decoder
      width), needed by instance routing.
    share_in_block: `share_in_block(make)` returns the module this entry
      made earlier in the same block, or `make()` (given by attach.py).
  """

  def __init__(self, in_features: int, out_features: int, *,
               num_experts: int, rank: int, top_k: int = 1,
               routing: str = "instance", global_expert: bool = False,
               share_gate: bool = False, activation: str | None = None,
               learned_scale: bool = False, alpha: float | None = None,
               axes=(None, None), instance_features: int | None = None,
               share_in_block: Callable | None = None, rngs: nnx.Rngs):
    if routing not in ROUTINGS:
      raise ValueError(f"sparse_lora routing={routing!r}; expected one of "
                       f"{ROUTINGS}.")
    if activation not in ACTIVATIONS:
      raise ValueError(f"sparse_lora activation={activation!r}; expected one "
                       f"of {list(ACTIVATIONS)}.")
    if rank < 1 or not 1 <= top_k <= num_experts:
      raise ValueError(f"sparse_lora needs rank >= 1 and 1 <= top_k <= "
                       f"num_experts, got rank={rank}, top_k={top_k}, "
                       f"num_experts={num_experts}.")
    if routing == "instance" and instance_features is None:
      raise ValueError(
          "sparse_lora routing='instance' routes on TokenInfo.instance, "
          "whose width the expert plan must know: build the model with "
          "omnismola.build.build_model (or attach.make_plan(..., "
          "instance_features=<decoder width>)).")
    self.routing = routing
    self.top_k = top_k
    self.activation = activation
    self.multiplier = (rank if alpha is None else alpha) / rank
    features = instance_features if routing == "instance" else in_features
    make_router = lambda: Router(
        features, num_experts,
        axis="embed" if routing == "instance" else axes[0], rngs=rngs)
    self.router = (share_in_block(make_router)
                   if share_gate and share_in_block else make_router())
    if self.router.kernel.shape != (features, num_experts):
      raise ValueError(
          f"share_gate: this layer routes {routing} inputs of width "
          f"{features}, but the block's shared router takes "
          f"{self.router.kernel.shape[0]}. Layers sharing a gate with "
          "routing='token' need one input width; use routing='instance' "
          "(one decision per example) or share_gate=False.")
    self.experts = LowRank(in_features, out_features, rank,
                           num_experts=num_experts, axes=axes, rngs=rngs)
    self.global_expert = (LowRank(in_features, out_features, rank, axes=axes,
                                  rngs=rngs) if global_expert else None)
    self.scale = (nnx.Param(jnp.ones(()), logical_axes=())
                  if learned_scale else None)

  def __call__(self, x: jax.Array, tokens: TokenInfo,
               base: Base | None = None) -> jax.Array:
    del base  # x and its tokens (or its instance) alone decide.
    if self.routing == "instance" and tokens.instance is None:
      raise ValueError(
          "sparse_lora routing='instance' needs TokenInfo.instance (the "
          "prompt embedding), which the VLM gives its decoder, connector and "
          "vision tower; this call has none (a tower run on its own?). Use "
          "routing='token' here.")
    probs = self.router(x if self.routing == "token" else tokens.instance)
    weights, top_gate = top_k_weights(probs, self.top_k)
    # Expert weights [B, T, E] and the global expert's [B, T], float32, zero
    # on padding.
    weights = jnp.where(tokens.valid[..., None], weights, 0.0)
    global_weight = jnp.where(tokens.valid, 1.0 - top_gate, 0.0)
    record_usage(self, weights)
    act = ACTIVATIONS[self.activation]
    # Every expert in one pair of wide products: [d, E*r], then [E*r, out].
    a, b = self.experts.a[...], self.experts.b[...]
    num_experts, rank = a.shape[0], a.shape[-1]
    a_wide = jnp.swapaxes(a, 0, 1).reshape(a.shape[1], num_experts * rank)
    # The unchosen experts' blocks are computed and weighed 0: not needed.
    with flops.required_share(self.top_k / num_experts):
      h = act(token_matmul(x, a_wide)).reshape(
          x.shape[:-1] + (num_experts, rank))
      h = h * weights[..., None].astype(h.dtype)
      y = token_matmul(h.reshape(x.shape[:-1] + (num_experts * rank,)),
                       b.reshape(num_experts * rank, b.shape[-1]))
    if self.global_expert is not None:
      h = act(token_matmul(x, self.global_expert.a[...]))
      y = y + token_matmul(h * global_weight[..., None].astype(h.dtype),
                           self.global_expert.b[...])
    y = self.multiplier * y
    return y if self.scale is None else self.scale[...] * y


KIND = Kind("sparse_lora", SparseLoRA, (LINEAR, BLOCK), routed=True)
