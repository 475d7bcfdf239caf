"""DoRA (Liu et al., 2024): a LoRA whose update is split into a direction
and a magnitude per output column.

    W' = m * (W + s A B) / ||W + s A B||_c,    y = x W' (+ bias)

with ||.||_c the norm of each column (over the input axis) and s = alpha /
rank. The norm is taken as a constant in the backward pass (the paper's
section 4.3, as PEFT does): no gradient flows through it, which saves the
memory of a second [in, out] product.

The magnitude is stored relative to the base kernel: m = g * ||W||_c, with
g = 1 at init. The kernel an adapter is built beside is a fresh one that a
pretrained checkpoint replaces later (train/init.py), so an absolute m
would start from the wrong norm; with g = 1 and B = 0 the layer computes
exactly the base layer whatever W is loaded.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.experts.kind import LINEAR, Kind
from omnismola.experts.lora import LoRA
from omnismola.models.layers import Base, TokenInfo


def column_norms(kernel: jax.Array) -> jax.Array:
  """||W||_c: the norm of each output column of W [in, out], float32."""
  return jnp.linalg.norm(kernel.astype(jnp.float32), axis=0)


class DoRA(LoRA):
  """Weight-decomposed low-rank adaptation of a linear layer.

  Options as `LoRA` (`rank`, `alpha`); its output is added to the layer's
  x W, so it returns x W' - x W.
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int,
               alpha: float | None = None, axes=(None, None),
               rngs: nnx.Rngs):
    super().__init__(in_features, out_features, rank=rank, alpha=alpha,
                     axes=axes, rngs=rngs)
    self.magnitude = nnx.Param(jnp.ones((out_features,)),
                               logical_axes=(axes[1],))

  def __call__(self, x: jax.Array, tokens: TokenInfo,
               base: Base | None = None) -> jax.Array:
    if base is None or base.kernel is None:
      raise ValueError("DoRA reweighs a linear layer's kernel: it attaches "
                       "to linear layers, called with their Base.")
    kernel = base.kernel.astype(jnp.float32)
    update = self.multiplier * (self.a[...] @ self.b[...])
    scale = (self.magnitude[...] * column_norms(kernel) /
             jax.lax.stop_gradient(column_norms(kernel + update)))
    # x W' = scale * (x W + s x A B); the layer adds x W itself.
    lora = super().__call__(x, tokens)
    return (scale - 1) * base.y + scale * lora


KIND = Kind("dora", DoRA, (LINEAR,))
