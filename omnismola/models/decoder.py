"""A Gemma-1-like decoder over embedded tokens, with an explicit KV cache.

Pre-norm blocks (RMSNorm with 1 + scale), RoPE on queries and keys,
multi-query / grouped-query attention, GeGLU MLP, a final RMSNorm and output
logits tied to the input embedding. The decoder does not build attention
masks or positions: the caller (`vlm.py`) owns the sequence layout and hands
them in, together with the TokenInfo.

The KV cache is a pytree passed in and returned, never stored in the module,
so decoding stays a pure function that jit and scan can carry.
"""
import dataclasses
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.models import layers
from omnismola.models.layers import LinearFactory, TokenInfo, make_dense

ROPE_MAX_WAVELENGTH = 10_000.0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes of the language decoder."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Decoder num_kv_heads={self.num_kv_heads} must "
                       f"divide num_heads={self.num_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"Decoder head_dim={self.head_dim} must be even "
                       "(RoPE rotates pairs of dimensions).")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every decoded slot, and where decoding stands.

  Attributes:
    k, v: one array [B, S, num_kv_heads, head_dim] per layer.
    valid: bool [B, S], slots holding a real token. Padding of shorter
      prompts stays in the middle of the cache and is masked out here.
    positions: int32 [B], the RoPE position of each example's next token.
    index: int32 [], the slot the next token is written to (the same for
      every example). Writing past S is clamped by XLA, so callers size S
      for everything they will append.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  positions: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, config: DecoderConfig, batch: int, length: int,
            dtype=jnp.float32) -> "KVCache":
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.depth))
    return cls(k=zeros, v=zeros, valid=jnp.zeros((batch, length), bool),
               positions=jnp.zeros((batch,), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  def take(self, indices: jax.Array) -> "KVCache":
    """The cache of examples `indices` (int [B']), e.g. reordered beams."""
    pick = lambda x: jnp.take(x, indices, axis=0)
    return self.replace(k=tuple(map(pick, self.k)), v=tuple(map(pick, self.v)),
                        valid=pick(self.valid), positions=pick(self.positions))


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
    return jnp.dot(h, self.embedding[...].T,
                   preferred_element_type=jnp.float32)


class DecoderLayer(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, path: str, config: DecoderConfig, *,
               make_linear: LinearFactory, rngs: nnx.Rngs):
    self.pre_attn_norm = layers.RMSNorm(config.width)
    self.attn = layers.Attention(
        f"{path}/attn", config.width, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        use_bias=False, rope_max_wavelength=ROPE_MAX_WAVELENGTH,
        make_linear=make_linear, rngs=rngs)
    self.pre_mlp_norm = layers.RMSNorm(config.width)
    self.mlp = layers.GeGLU(f"{path}/mlp", config.width, config.mlp_dim,
                            make_linear=make_linear, rngs=rngs)

  def __call__(self, x, tokens, mask, positions, kv=None, index=0):
    attn, kv = self.attn(self.pre_attn_norm(x), tokens, mask,
                         positions=positions, kv=kv, index=index)
    x = x + attn
    return x + self.mlp(self.pre_mlp_norm(x), tokens), kv


class Decoder(nnx.Module):
  """Embedded tokens [B, T, width] -> final normed states [B, T, width]."""

  def __init__(self, config: DecoderConfig, *, path: str = "decoder",
               make_linear: LinearFactory = make_dense, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config.vocab_size, config.width, rngs=rngs)
    self.layers = nnx.List([
        DecoderLayer(f"{path}/layers/{i}", config, make_linear=make_linear,
                     rngs=rngs) for i in range(config.depth)])
    self.final_norm = layers.RMSNorm(config.width)

  def embed(self, text: jax.Array) -> jax.Array:
    return self.embedder.encode(text)

  def logits(self, h: jax.Array) -> jax.Array:
    return self.embedder.decode(h)

  def __call__(self, x: jax.Array, tokens: TokenInfo, mask: jax.Array,
               positions: jax.Array, *,
               kv: Sequence[tuple[jax.Array, jax.Array]] | None = None,
               index: jax.Array | int = 0):
    """Runs the layers.

    Args:
      x: [B, T, width] embedded inputs.
      tokens: TokenInfo [B, T].
      mask: bool [B, T, S] attention mask (S = T without a cache).
      positions: int [B, T] RoPE positions.
      kv: optional per-layer cache (k, v) [B, S, K, D]; x's keys and values
        are written into it from slot `index` on.
      index: cache slot of x's first token.

    Returns:
      (h [B, T, width] after the final norm, per-layer (k, v) attended to).
    """
    new_kv = []
    for i, layer in enumerate(self.layers):
      x, layer_kv = layer(x, tokens, mask, positions,
                          kv=None if kv is None else kv[i], index=index)
      new_kv.append(layer_kv)
    return self.final_norm(x), tuple(new_kv)
