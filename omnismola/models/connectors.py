"""Connectors: vision features -> decoder-width image tokens [B, L, d_dec].

`make_connector(kind, ...)` is the one entry point; kinds register in
`CONNECTORS` and share one signature: built from the vision encoders'
configs ({module name: ViTConfig}, `vit` first), called as
`y, reports = connector(features, tokens)` with one feature map
[B, N_i, d_i] per encoder and the TokenInfo of the L output tokens.
`reports` are those of the routers in scanned layers (MoVE's ADT); other
routers' reports stay sown until the VLM collects them.

* `linear` (PaliGemma) and `mlp` (LLaVA, CuMo) map one encoder's tokens
  one to one (L = N). CuMo's MoE connector is a `sparse_moe` expert with
  `targets='connector/mlp'` replacing the `mlp` connector's block.
* `move` (MoME's MoVE, docs/models.md) mixes two or more encoders: per
  encoder an adaptive transformation (ADT) to L tokens and a projection,
  weighed by an instance-level soft router or summed (`mixer='add'`).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnismola.models import layers
from omnismola.models import stack
from omnismola.models import vit
from omnismola.models.layers import Dense, TokenInfo, record_usage
from omnismola.models.vit import ViTConfig


# How the `move` connector combines its branches (`MoVEConfig.mixer`).
MOVE_MIXERS = ("router", "add")


@dataclasses.dataclass(frozen=True)
class MoVEConfig:
  """Options of the `move` connector (`model.move`).

  Attributes:
    num_tokens: L, the image tokens every encoder is pooled to, a square;
      0 = the primary encoder's (`vit`) patch count.
    adt_depth: M, layers of each encoder's adaptive transformation (MoME: 6).
    router_dim: hidden width of the router MLP; 0 = the decoder width.
    mixer: "router" (MoME's instance-level soft router) or "add" (the
      branches summed: MoME's baseline).
  """
  num_tokens: int = 0
  adt_depth: int = 1
  router_dim: int = 0
  mixer: str = "router"

  def __post_init__(self):
    if self.num_tokens < 0 or math.isqrt(self.num_tokens)**2 != self.num_tokens:
      raise ValueError(f"model.move.num_tokens={self.num_tokens} must be a "
                       "square number (the side of the pooled grid squared) "
                       "or 0 for the primary encoder's patch count.")
    if self.adt_depth < 1:
      raise ValueError(f"model.move.adt_depth={self.adt_depth} must be >= 1.")
    if self.router_dim < 0:
      raise ValueError(f"model.move.router_dim={self.router_dim} must be "
                       ">= 1, or 0 for the decoder width.")
    if self.mixer not in MOVE_MIXERS:
      raise ValueError(f"model.move.mixer={self.mixer!r}; expected one of "
                       f"{MOVE_MIXERS}.")


class LinearConnector(nnx.Module):
  """One projection, as in PaliGemma."""

  def __init__(self, encoders: dict[str, ViTConfig], out_features: int, *,
               move: MoVEConfig, plan: stack.Plan, loop: stack.LayerLoop,
               rngs: nnx.Rngs):
    del move, plan, loop  # No options, no towers.
    # Both sides are model widths; `embed` twice lets the sharding rules
    # shard one of them (they never shard a mesh axis twice).
    self.proj = Dense(encoders["vit"].width, out_features,
                      axes=("embed", "embed"), use_bias=True, rngs=rngs)

  def __call__(self, features: tuple[jax.Array, ...], tokens: TokenInfo):
    (x,) = features
    return self.proj(x, tokens), {}


class MlpConnector(nnx.Module):
  """LLaVA-1.5's (and CuMo's) projector: fc2(gelu(fc1(x))), hidden d_dec,
  an `Mlp` block at `<path>/mlp` that `gelu` sparse MoE experts mirror."""

  def __init__(self, encoders: dict[str, ViTConfig], out_features: int, *,
               move: MoVEConfig, plan: stack.Plan, loop: stack.LayerLoop,
               rngs: nnx.Rngs):
    del move, plan, loop  # No options, no towers.
    self.mlp = layers.Mlp(encoders["vit"].width, out_features,
                          out_features=out_features, rngs=rngs)

  def __call__(self, features: tuple[jax.Array, ...], tokens: TokenInfo):
    (x,) = features
    return self.mlp(x, tokens), {}


# --- MoVE (MoME) -----------------------------------------------------------


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """float32 [size_out, size_in]: row i averages the inputs of output bin i,
  [floor(i n / m), ceil((i + 1) n / m)): PyTorch's adaptive average pooling
  bins (MoME's), which overlap when m does not divide n."""
  matrix = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -(-(i + 1) * size_in // size_out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, grid: int, side: int) -> jax.Array:
  """2D adaptive average pooling of a row-major patch grid: [B, grid * grid,
  C] -> [B, side * side, C]."""
  batch, _, channels = x.shape
  pool = jnp.asarray(adaptive_pool_matrix(grid, side), x.dtype)
  y = x.reshape(batch, grid, grid, channels)
  # Rows, then columns: two small products.
  y = jnp.einsum("ih,bhwc->biwc", pool, y)
  y = jnp.einsum("jw,biwc->bijc", pool, y)
  return y.reshape(batch, side * side, channels)


class AdaptiveLayer(nnx.Module):
  """One ADT layer at an encoder's width: pre-LN self-attention among the
  pooled queries, cross-attention to the encoder's full map (MoME's is
  deformable: a simplification, docs/models.md), MLP."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.norm1 = layers.LayerNorm(config.width, eps=config.norm_eps)
    self.self_attn = vit.encoder_attention(config, rngs=rngs)
    self.norm2 = layers.LayerNorm(config.width, eps=config.norm_eps)
    self.cross_attn = vit.encoder_attention(config, rngs=rngs)
    self.norm3 = layers.LayerNorm(config.width, eps=config.norm_eps)
    self.mlp = layers.Mlp(config.width, config.mlp_dim, rngs=rngs)

  def __call__(self, x: jax.Array, tokens: TokenInfo, features: jax.Array,
               feature_tokens: TokenInfo):
    attn, _ = self.self_attn(self.norm1(x), tokens, mask=None)
    x = x + attn
    cross, _ = self.cross_attn(self.norm2(x), tokens, mask=None,
                               context=(features, feature_tokens))
    x = x + cross
    x = x + self.mlp(self.norm3(x), tokens)
    return layers.constrain(x, ("batch", "length", "embed"))


class MoVEBranch(nnx.Module):
  """One encoder's path through MoVE: f_i = proj(norm(ADT(pool(x), x))),
  the ADT layers a scanned stack (`layers`)."""

  def __init__(self, encoder: ViTConfig, num_tokens: int, adt_depth: int,
               out_features: int, *, plan: stack.Plan, loop: stack.LayerLoop,
               rngs: nnx.Rngs):
    self.loop = loop
    self.grid = encoder.image_size // encoder.patch_size
    self.side = math.isqrt(num_tokens)
    self.segments = stack.add_tower_layers(
        self, "layers", lambda rngs: AdaptiveLayer(encoder, rngs=rngs),
        adt_depth, plan, rngs)
    self.norm = layers.LayerNorm(encoder.width, eps=encoder.norm_eps)
    self.proj = Dense(encoder.width, out_features, axes=("embed", "embed"),
                      use_bias=True, rngs=rngs)

  def __call__(self, features: jax.Array, tokens: TokenInfo):
    """[B, N_i, d_i] -> ([B, L, d_dec], the ADT layers' reports stacked
    [adt_depth, ...])."""
    feature_tokens = TokenInfo.image(features.shape[0], features.shape[1],
                                     example_instance(tokens),
                                     rows=tokens.valid[:, 0])
    x = adaptive_avg_pool(features, self.grid, self.side)

    x, _, reports = stack.scan_tower(
        self, self.segments,
        lambda layer, x, _: (layer(x, tokens, features, feature_tokens), None),
        x, (), loop=self.loop)
    return self.proj(self.norm(x), tokens), reports


def example_instance(tokens: TokenInfo) -> jax.Array | None:
  """[B, D]: each row's instance vector (a row of image tokens is one
  example's, so its first token's)."""
  return None if tokens.instance is None else tokens.instance[:, 0]


class InstanceRouter(nnx.Module):
  """MoME's router G(I) = softmax(W2 gelu(W1 I + b1) + b2) over choices,
  I one vector per example (instance-level routing)."""

  def __init__(self, in_features: int, hidden: int, num_choices: int, *,
               rngs: nnx.Rngs):
    self.hidden = Dense(in_features, hidden, axes=("embed", "mlp"),
                        use_bias=True, rngs=rngs)
    # The few choices are never sharded.
    self.out = Dense(hidden, num_choices, axes=("mlp", None), use_bias=True,
                     rngs=rngs)

  def __call__(self, instance: jax.Array) -> jax.Array:
    """float32 [B, num_choices] weights (summing to 1) from [B, in]."""
    # The linears see one token per example: the prompt's mean embedding,
    # a text summary of the bidirectional prefix.
    ones = jnp.ones((instance.shape[0], 1), bool)
    tokens = TokenInfo.text(valid=ones, bidirectional=ones).replace(
        instance=instance[:, None])
    hidden = jax.nn.gelu(self.hidden(instance[:, None], tokens))
    logits = self.out(hidden, tokens)[:, 0]
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class MoVEConnector(nnx.Module):
  """MoME's mixture of vision encoders: F = sum_i G(I)_i f_i.

  One `MoVEBranch` per encoder, named as it (`connector/vit`, ...), and an
  `InstanceRouter` (`connector/router`) fed `tokens.instance`, which
  reports its weights [B, L, encoders] as `usage` while recording. With
  `move.mixer='add'` there is no router and F = sum_i f_i.
  """

  def __init__(self, encoders: dict[str, ViTConfig], out_features: int, *,
               move: MoVEConfig, plan: stack.Plan, loop: stack.LayerLoop,
               rngs: nnx.Rngs):
    num_tokens = move.num_tokens or encoders["vit"].num_patches
    self.names = tuple(encoders)
    for name, encoder in encoders.items():
      setattr(self, name, MoVEBranch(
          encoder, num_tokens, move.adt_depth, out_features,
          plan=plan.child(name), loop=loop, rngs=rngs))
    self.router = (InstanceRouter(out_features,
                                  move.router_dim or out_features,
                                  len(encoders), rngs=rngs)
                   if move.mixer == "router" else None)

  def __call__(self, features: tuple[jax.Array, ...], tokens: TokenInfo):
    """One feature map per encoder -> ([B, L, d_dec], reports)."""
    branches, reports = [], {}
    for name, x in zip(self.names, features, strict=True):
      y, branch_reports = getattr(self, name)(x, tokens)
      branches.append(y)
      reports.update(branch_reports)
    if self.router is None:  # mixer="add".
      return sum(branches), reports
    if tokens.instance is None:
      raise ValueError("connector='move' routes by TokenInfo.instance (the "
                       "prompt's mean embedding); embed_image needs it.")
    weights = self.router(example_instance(tokens))  # [B, encoders]
    record_usage(self, layers.per_token(weights, tokens.valid.shape[1]))
    return sum(weights[:, i, None, None].astype(y.dtype) * y
               for i, y in enumerate(branches)), reports


CONNECTORS = {
    "linear": LinearConnector,
    "mlp": MlpConnector,
    "move": MoVEConnector,
}


def make_connector(kind: str, encoders: dict[str, ViTConfig],
                   out_features: int, *, move: MoVEConfig, plan: stack.Plan,
                   loop: stack.LayerLoop = stack.LayerLoop(),
                   rngs: nnx.Rngs) -> nnx.Module:
  """The connector of `kind` (a key of CONNECTORS) from the encoders'
  configs to the decoder width `out_features` (see module docstring), with
  the connector's `plan` and the `loop` of every tower."""
  if kind not in CONNECTORS:
    raise ValueError(f"Unknown connector {kind!r} (model.connector); known "
                     f"connectors: {sorted(CONNECTORS)}.")
  return CONNECTORS[kind](encoders, out_features, move=move, plan=plan,
                          loop=loop, rngs=rngs)
