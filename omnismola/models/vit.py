"""A SigLIP-like ViT: patches -> pre-LN encoder -> tokens [B, N, width].

The parameter layout follows SigLIP's so its checkpoints convert by renaming
and reshaping: the patch embedding is a Dense over flattened p*p*3 patches
(the conv kernel [p, p, 3, width] reshaped), the position embedding is
learned, attention and MLP have biases, and there is no pooling head. The
layers are scanned stacks (`stack.py`) with the experts the plan attaches.
"""
import dataclasses

import jax
from flax import nnx

from omnismola.models import layers
from omnismola.models import stack
from omnismola.models.layers import Dense, TokenInfo


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Sizes of the vision encoder."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"ViT image_size={self.image_size} must be a multiple "
                       f"of patch_size={self.patch_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"ViT width={self.width} must be a multiple of "
                       f"num_heads={self.num_heads}.")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size)**2


def patchify(image: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order.

  Each patch is flattened as (row, column, channel), the order of a conv
  kernel [p, p, C, width], so Dense(patches) equals a stride-p conv.
  """
  batch, height, width, channels = image.shape
  p = patch_size
  x = image.reshape(batch, height // p, p, width // p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def encoder_attention(config: ViTConfig, *,
                      rngs: nnx.Rngs) -> layers.Attention:
  """The ViT's attention at `config`'s width: all heads for keys and values,
  biases, no RoPE (positions are learned embeddings)."""
  heads = config.num_heads
  return layers.Attention(
      config.width, num_heads=heads, num_kv_heads=heads,
      head_dim=config.width // heads, use_bias=True,
      rope_max_wavelength=None, rngs=rngs)


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block with bidirectional attention."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.norm1 = layers.LayerNorm(config.width, eps=config.norm_eps)
    self.attn = encoder_attention(config, rngs=rngs)
    self.norm2 = layers.LayerNorm(config.width, eps=config.norm_eps)
    self.mlp = layers.Mlp(config.width, config.mlp_dim, rngs=rngs)

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    attn, _ = self.attn(self.norm1(x), tokens, mask=None)
    x = x + attn
    x = x + self.mlp(self.norm2(x), tokens)
    return layers.constrain(x, ("batch", "length", "embed"))


class ViT(nnx.Module):
  """Image [B, H, W, 3] in [-1, 1] -> patch tokens [B, N, width]."""

  def __init__(self, config: ViTConfig, *,
               plan: stack.Plan = stack.Plan("vit"),
               loop: stack.LayerLoop = stack.LayerLoop(), rngs: nnx.Rngs):
    self.config = config
    self.loop = loop
    self.embedding = Dense(config.patch_size**2 * 3, config.width,
                           axes=("patch", "embed"), use_bias=True, rngs=rngs)
    init = jax.nn.initializers.normal(stddev=config.width**-0.5)
    self.pos_embedding = nnx.Param(
        init(rngs.params(), (config.num_patches, config.width)),
        logical_axes=("vision_patches", "embed"))
    self.segments = stack.add_tower_layers(
        self, "layers", lambda rngs: EncoderLayer(config, rngs=rngs),
        config.depth, plan, rngs)
    self.norm = layers.LayerNorm(config.width, eps=config.norm_eps)

  def __call__(self, image: jax.Array, tokens: TokenInfo):
    """(tokens [B, N, width], its layers' routers' reports stacked over
    each segment's layers); `tokens` is the TokenInfo of the N patches."""
    size = self.config.image_size
    if image.shape[1:] != (size, size, 3):
      raise ValueError(f"The ViT expects images [B, {size}, {size}, 3], got "
                       f"{image.shape}.")
    patches = patchify(image, self.config.patch_size)
    x = self.embedding(patches, tokens) + self.pos_embedding[...]
    x = layers.constrain(x, ("batch", "length", "embed"))

    x, _, reports = stack.scan_tower(
        self, self.segments, lambda layer, x, _: (layer(x, tokens), None), x,
        (), loop=self.loop)
    return self.norm(x), reports
