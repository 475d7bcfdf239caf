"""Low-rank maps, and one low-rank adapter: y = (alpha / rank) * x A B, with
B = 0 at init."""
import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.experts.kind import LINEAR, Kind
from omnismola.models.layers import Base, TokenInfo, token_matmul


class LowRank(nnx.Module):
  """The maps A [(E,) in, r] and B [(E,) r, out] of x A B, B = 0 at init.

  `axes` are the logical axes of the wrapped module's input and output; the
  rank axis is called `lora_rank` so sharding rules can keep it unsharded.
  With `num_experts` the maps get a leading `expert` axis, the layout
  `upcycle.expert_copies` makes from one LoRA's {a, b}.
  """

  def __init__(self, in_features: int, out_features: int, rank: int, *,
               num_experts: int | None = None, axes, rngs: nnx.Rngs):
    in_axis, out_axis = axes
    lead = () if num_experts is None else (num_experts,)
    lead_axes = () if num_experts is None else ("expert",)
    init_a = jax.nn.initializers.normal(stddev=in_features**-0.5)
    self.a = nnx.Param(init_a(rngs.params(), lead + (in_features, rank)),
                       logical_axes=lead_axes + (in_axis, "lora_rank"))
    self.b = nnx.Param(jnp.zeros(lead + (rank, out_features)),
                       logical_axes=lead_axes + ("lora_rank", out_axis))


class LoRA(LowRank):
  """A LoRA branch added to a linear layer of shape [in_features, out_features];
  with B = 0 at init the layer computes exactly its base at step 0."""

  def __init__(self, in_features: int, out_features: int, *, rank: int,
               alpha: float | None = None, axes=(None, None),
               rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    super().__init__(in_features, out_features, rank, axes=axes, rngs=rngs)
    self.multiplier = (rank if alpha is None else alpha) / rank

  def __call__(self, x: jax.Array, tokens: TokenInfo,
               base: Base | None = None) -> jax.Array:
    del tokens, base  # Every token alike; x alone decides.
    return self.multiplier * token_matmul(token_matmul(x, self.a[...]),
                                          self.b[...])


KIND = Kind("lora", LoRA, (LINEAR,))
