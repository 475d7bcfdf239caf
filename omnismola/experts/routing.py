"""Router pieces shared by the expert kinds: the tokens a modality's experts
serve, normalised logits, masked softmax."""
import jax
import jax.numpy as jnp

# The modalities that experts (SMoLA pools, sparse MoE pools) may serve.
MODALITIES = ("all", "image", "text")
_EPS = 1e-6


def modality_tokens(tokens, modality: str) -> jax.Array:
  """bool [B, T]: the tokens (a `TokenInfo`'s) that experts of `modality`
  serve; padding is served by none."""
  return {"all": tokens.valid, "image": tokens.is_image & tokens.valid,
          "text": tokens.is_text}[modality]


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


def grouped_softmax(logits: jax.Array, groups: jax.Array) -> jax.Array:
  """Softmax of logits [B, T, ...] over the tokens (axis 1) of each token's
  own group (groups: bool [B, T, G], each token in at most one group);
  zeros for tokens in no group.
  """
  member = groups.reshape(groups.shape + (1,) * (logits.ndim - 2))
  # Each group's own peak: one group's tokens never underflow another's.
  peak = jnp.max(jnp.where(member, logits[:, :, None], -jnp.inf), axis=1)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)        # [B, G, ...]
  own = lambda per_group: jnp.sum(
      jnp.where(member, per_group[:, None], 0.0), axis=2)  # -> [B, T, ...]
  grouped = jnp.any(groups, axis=-1).reshape(
      logits.shape[:2] + (1,) * (logits.ndim - 2))
  weights = jnp.where(grouped, jnp.exp(logits - own(peak)), 0.0)
  total = jnp.sum(jnp.where(member, weights[:, :, None], 0.0), axis=1)
  return weights / jnp.where(grouped, own(jnp.where(total > 0, total, 1.0)),
                             1.0)


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
