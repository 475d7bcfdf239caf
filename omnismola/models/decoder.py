"""A Gemma-style decoder (Gemma 1 and Gemma 2) with an explicit KV cache.

Pre-norm blocks, RoPE, multi-query / grouped-query attention, GeGLU MLP and
logits tied to the embedding; Gemma 2's additions are config switches
(docs/models.md). The layers are scanned stacks (`stack.py`) with the
experts the plan attaches; the MLP blocks are built with `causal=True`, so
no routing lets a suffix token see later tokens. The caller (`vlm.py`)
owns the sequence layout and hands in masks, positions and the TokenInfo.
The KV cache is a pytree passed in and returned, never stored in the
module, so decoding stays a pure function that jit and scan can carry.
"""
import dataclasses

import flax
import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from omnismola.models import layers
from omnismola.models import stack
from omnismola.models.layers import TokenInfo


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes and variant switches (defaults: Gemma 1) of the decoder."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_max_wavelength: float = 10_000.0
  norm_eps: float = 1e-6
  post_norms: bool = False
  attn_logit_softcap: float = 0.0   # 0 = off.
  final_logit_softcap: float = 0.0  # 0 = off.
  query_pre_attn_scalar: float = 0.0  # Queries scaled by its **-0.5.
  sliding_window: int = 0  # Window of the even-numbered layers; 0 = off.

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Decoder num_kv_heads={self.num_kv_heads} must "
                       f"divide num_heads={self.num_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"Decoder head_dim={self.head_dim} must be even "
                       "(RoPE rotates pairs of dimensions).")
    if self.sliding_window < 0:
      raise ValueError(f"Decoder sliding_window={self.sliding_window} must "
                       "be >= 0 (0 turns it off).")

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim)**-0.5

  def sliding_layers(self) -> np.ndarray:
    """bool [depth]: the layers that attend within the sliding window."""
    return (np.arange(self.depth) % 2 == 0) & (self.sliding_window > 0)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every decoded slot, and where decoding stands.

  Attributes:
    k, v: [depth, B, S, num_kv_heads, head_dim], all layers stacked.
    valid: bool [B, S], slots holding a real token (shorter prompts'
      padding stays in the middle of the cache).
    key_positions: int32 [B, S], each slot's RoPE position (for windows).
    positions: int32 [B], the RoPE position of each example's next token.
    index: int32 [], the slot the next token is written to (the same for
      every example). Writing past S is clamped by XLA, so callers size S
      for everything they will append.
    instance: float32 [B, width], each example's prompt embedding for
      instance-level routers (`TokenInfo.instance`), fixed at prefill.
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  key_positions: jax.Array
  positions: jax.Array
  index: jax.Array
  instance: jax.Array

  def take(self, indices: jax.Array) -> "KVCache":
    """The cache of examples `indices` (int [B']), e.g. reordered beams."""
    pick = lambda x, axis: jnp.take(x, indices, axis=axis)
    return self.replace(k=pick(self.k, 1), v=pick(self.v, 1),
                        valid=pick(self.valid, 0),
                        key_positions=pick(self.key_positions, 0),
                        positions=pick(self.positions, 0),
                        instance=pick(self.instance, 0))


class Embedder(nnx.Module):
  """Token embedding, also the (tied) output projection."""

  def __init__(self, vocab_size: int, width: int, *, rngs: nnx.Rngs):
    # stddev 1/sqrt(width): scaled by sqrt(width) on input, the embeddings
    # start at unit variance, and so do the tied logits of normed states.
    init = jax.nn.initializers.normal(stddev=width**-0.5)
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, width)),
                               logical_axes=("vocab", "embed"))

  def encode(self, tokens: jax.Array) -> jax.Array:
    """int [B, T] -> [B, T, width], scaled by sqrt(width) as in Gemma."""
    table = self.embedding[...]
    return jnp.take(table, tokens, axis=0) * jnp.sqrt(
        jnp.asarray(table.shape[1], table.dtype))

  def decode(self, h: jax.Array) -> jax.Array:
    """[..., width] -> float32 logits [..., vocab]."""
    table = self.embedding[...]
    return jnp.dot(h.astype(table.dtype), table.T,
                   preferred_element_type=jnp.float32)


class DecoderLayer(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); Gemma 2 norms both outputs."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    norm = lambda: layers.RMSNorm(config.width, eps=config.norm_eps)
    self.pre_attn_norm = norm()
    self.attn = layers.Attention(
        config.width, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        use_bias=False, rope_max_wavelength=config.rope_max_wavelength,
        query_scale=config.query_scale, logit_cap=config.attn_logit_softcap,
        rngs=rngs)
    self.post_attn_norm = norm() if config.post_norms else None
    self.pre_mlp_norm = norm()
    self.mlp = layers.GeGLU(config.width, config.mlp_dim, causal=True,
                            rngs=rngs)
    self.post_mlp_norm = norm() if config.post_norms else None

  def __call__(self, x, tokens, mask, positions, kv=None, index=0):
    """(x, kv: this layer's keys and values)."""
    attn, kv = self.attn(self.pre_attn_norm(x), tokens, mask,
                         positions=positions, kv=kv, index=index)
    if self.post_attn_norm is not None:
      attn = self.post_attn_norm(attn)
    x = x + attn
    mlp = self.mlp(self.pre_mlp_norm(x), tokens)
    if self.post_mlp_norm is not None:
      mlp = self.post_mlp_norm(mlp)
    return layers.constrain(x + mlp, ("batch", "length", "embed")), kv


class Decoder(nnx.Module):
  """Embedded tokens [B, T, width] -> final normed states [B, T, width]."""

  def __init__(self, config: DecoderConfig, *,
               plan: stack.Plan = stack.Plan("decoder"),
               loop: stack.LayerLoop = stack.LayerLoop(), rngs: nnx.Rngs):
    self.config = config
    self.loop = loop
    self.embedder = Embedder(config.vocab_size, config.width, rngs=rngs)
    self.segments = stack.add_tower_layers(
        self, "layers", lambda rngs: DecoderLayer(config, rngs=rngs),
        config.depth, plan, rngs)
    self.final_norm = layers.RMSNorm(config.width, eps=config.norm_eps)

  def embed(self, text: jax.Array) -> jax.Array:
    return self.embedder.encode(text)

  def logits(self, h: jax.Array) -> jax.Array:
    """float32 logits, soft-capped if the config says so (Gemma 2)."""
    return layers.softcap(self.embedder.decode(h),
                          self.config.final_logit_softcap)

  def __call__(self, x: jax.Array, tokens: TokenInfo, mask: jax.Array,
               positions: jax.Array, *, sliding_mask: jax.Array | None = None,
               kv: tuple[jax.Array, jax.Array] | None = None,
               index: jax.Array | int = 0):
    """Runs the layers over x [B, T, width] (TokenInfo `tokens`, RoPE
    `positions` int [B, T]) under `mask` bool [B, T, S], and `sliding_mask`
    (required with a window: `sliding_window_mask`) in sliding layers.
    `kv`: optional cache (k, v), each [depth, B, S, K, D], written from
    slot `index` on.

    Returns:
      (h [B, T, width] after the final norm, the updated cache or None,
       the layers' routers' reports stacked over each segment's layers).
    """
    sliding = self.config.sliding_layers()
    if sliding.any() and sliding_mask is None:
      raise ValueError("This decoder has sliding-window layers "
                       f"(sliding_window={self.config.sliding_window}): "
                       "pass sliding_mask.")

    def body(layer, x, per_layer):
      is_sliding, layer_kv = per_layer
      layer_mask = (jnp.where(is_sliding, sliding_mask, mask)
                    if sliding.any() else mask)
      x, layer_kv = layer(x, tokens, layer_mask, positions, kv=layer_kv,
                          index=index)
      return x, (layer_kv if kv is not None else None)

    x = layers.constrain(x, ("batch", "length", "embed"))
    x, new_kv, reports = stack.scan_tower(self, self.segments, body, x,
                                          (jnp.asarray(sliding), kv),
                                          loop=self.loop)
    return self.final_norm(x), new_kv, reports


def sliding_window_mask(mask: jax.Array, positions: jax.Array,
                        key_positions: jax.Array, window: int,
                        query_bidirectional: jax.Array | None = None,
                        key_bidirectional: jax.Array | None = None):
  """`mask` limited to keys less than `window` positions behind the query
  (None when `window` is 0). Pairs of bidirectional tokens (bool [B, T] x
  [B, S]) keep seeing each other, as in transformers' PaliGemma 2."""
  if not window:
    return None
  near = positions[:, :, None] - key_positions[:, None, :] < window
  if query_bidirectional is not None:
    near = near | (query_bidirectional[:, :, None] &
                   key_bidirectional[:, None, :])
  return mask & near
