"""Router pieces shared by the expert kinds: normalised logits, masked softmax."""
import jax
import jax.numpy as jnp

_EPS = 1e-6


def inverse_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """1 / |x| along `axis` (kept, size 1), safe at zero."""
  return jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + _EPS)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / |x| along `axis`, safe at zero (Soft MoE's normalisation)."""
  return x * inverse_norm(x, axis)


def cosine_logits(x: jax.Array, phi: jax.Array, scale: jax.Array) -> jax.Array:
  """<l2n(x), scale * l2n(phi)> for x [..., d] and phi [d, n, p] -> [..., n, p].

  Normalising both sides keeps the softmax from collapsing to one-hot as the
  width grows (Soft MoE, appendix E); the learned scalar `scale` sets the
  temperature.
  """
  x = l2_normalize(x.astype(jnp.float32), axis=-1)
  phi = scale * l2_normalize(phi.astype(jnp.float32), axis=0)
  return jnp.einsum("...d,dnp->...np", x, phi)


def masked_softmax(logits: jax.Array, mask: jax.Array, axis) -> jax.Array:
  """Softmax over `axis` restricted to `mask`; all-masked slices give zeros.

  `mask` broadcasts against `logits`. Plain softmax of -inf everywhere is NaN,
  which would poison gradients of sequences without tokens of a modality.
  """
  mask = jnp.broadcast_to(mask, logits.shape)
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=axis, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.where(mask, jnp.exp(logits - peak), 0.0)
  total = jnp.sum(weights, axis=axis, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)
