"""Building blocks shared by the vision encoder and the decoder.

`TokenInfo` (per-position facts handed to every linear layer, so experts
route by modality and attention group), `Dense` and the MLP blocks `Mlp`
(GELU: ViT, connector) and `GeGLU` (decoder), which `experts/attach.py`
finds in the built graph to add adapters or replace blocks, norms, RoPE and
attention with grouped key/value heads. Routers' reports travel through
`report` / `pop_reports` (docs/architecture.md).

Parameters carry `logical_axes` metadata that `train/partitioning.py` maps
to mesh axes; `constrain(x, axes)` pins large activations' sharding while a
trainer traces under `activation_sharding(...)` and does nothing otherwise.
"""
import contextlib
import contextvars
import functools
import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


@contextlib.contextmanager
def _setting(variable: contextvars.ContextVar, value):
  token = variable.set(value)
  try:
    yield
  finally:
    variable.reset(token)


# (logical axes, shape) -> jax.sharding.Sharding, or None outside a trainer.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar(
    "activation_sharding", default=None)


def activation_sharding(to_sharding: Callable[[Axes, tuple[int, ...]], object]):
  """Within this context, `constrain` pins activations to `to_sharding`."""
  return _setting(_ACTIVATION_SHARDING, to_sharding)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """x with the sharding its logical `axes` map to (see module docstring)."""
  to_sharding = _ACTIVATION_SHARDING.get()
  if to_sharding is None:
    return x
  return jax.lax.with_sharding_constraint(x, to_sharding(axes, x.shape))


# True while `recording_usage()` is active (see `record_usage`).
_RECORDING_USAGE: contextvars.ContextVar = contextvars.ContextVar(
    "recording_usage", default=False)


def recording_usage():
  """Within this context, routers keep their per-token expert weights (for
  `omnismola.analyze` only: training never records)."""
  return _setting(_RECORDING_USAGE, True)


def report(module: nnx.Module, name: str, value) -> None:
  """Hands `value` out of the forward pass as the module's report `name`:
  sown, so a router deep inside other modules reports without changing what
  its parents return (`pop_reports` collects it)."""
  module.sow(nnx.Intermediate, name, value)


def record_usage(module: nnx.Module, weights: jax.Array) -> None:
  """Reports a router's expert weights [B, T, E] (each token's weight on
  each expert) as its `usage`, while recording."""
  if _RECORDING_USAGE.get():
    report(module, "usage", weights)


def pop_reports(module: nnx.Module, prefix: str = "") -> dict[str, dict]:
  """Removes what the routers inside `module` reported and returns it:
  {router path (relative to `module`, under `prefix`): {report name: value}},
  {} when nothing reported."""
  reports = {}
  for path, variable in nnx.to_flat_state(nnx.pop(module, nnx.Intermediate)):
    *router, name = map(str, path)
    calls = variable.get_value()
    if len(calls) != 1:
      raise ValueError(f"{'/'.join(map(str, path))}: reported {len(calls)} "
                       "times in one pass; a router runs once.")
    reports.setdefault("/".join([prefix, *router] if prefix else router),
                       {})[name] = calls[0]
  return reports


def per_token(instance: jax.Array | None, length: int) -> jax.Array | None:
  """One vector per example [B, D] as every token's copy [B, length, D]."""
  if instance is None:
    return None
  return jnp.broadcast_to(instance[:, None],
                          (instance.shape[0], length, instance.shape[-1]))


@flax.struct.dataclass
class TokenInfo:
  """What each position of a [B, T] token sequence is.

  Attributes:
    is_image: bool [B, T], the position holds an image token.
    valid: bool [B, T], the position is a real token (False for padding).
    bidirectional: bool [B, T], the token belongs to the bidirectional group
      (vision encoder tokens; the decoder's image + prefix); valid tokens
      outside it are causal.
    instance: float [B, T, D] or None: each token's copy of its example's
      vector for instance-level routers (the prompt's mean embedding, see
      `VLM`; per token, so packed rows need no other shape).
    segment: int [B, T] or None (one example per row, e.g. decoding): the
      example (1 to `num_segments`; 0 on padding) each token belongs to.
    num_segments: the examples a row holds at most (static; > 1: packed).
  """
  is_image: jax.Array
  valid: jax.Array
  bidirectional: jax.Array
  instance: jax.Array | None = None
  segment: jax.Array | None = None
  num_segments: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def groups(self) -> jax.Array:
    """bool [B, T, G]: the bidirectional groups (Soft MoE mixes within
    one): a row's (G = 1), or each packed example's (G = num_segments)."""
    if self.segment is None:
      return self.bidirectional[..., None]
    return self.bidirectional[..., None] & (
        self.segment[..., None] == jnp.arange(1, self.num_segments + 1))

  @property
  def is_text(self) -> jax.Array:
    return self.valid & ~self.is_image

  @classmethod
  def image(cls, batch: int, length: int, instance: jax.Array | None = None,
            rows: jax.Array | None = None) -> "TokenInfo":
    """Image tokens, all in one bidirectional group; valid in the rows
    where `rows` (bool [B]) holds, all by default (not in empty image slots
    of packed rows). `instance` [B, D]: each row's example vector."""
    valid = jnp.ones((batch, length), bool)
    if rows is not None:
      valid = valid & rows[:, None]
    return cls(is_image=jnp.ones((batch, length), bool), valid=valid,
               bidirectional=valid, instance=per_token(instance, length))

  @classmethod
  def text(cls, valid: jax.Array, bidirectional: jax.Array) -> "TokenInfo":
    """Text tokens; padding is never bidirectional."""
    valid = valid.astype(bool)
    return cls(is_image=jnp.zeros_like(valid), valid=valid,
               bidirectional=bidirectional.astype(bool) & valid)

  @classmethod
  def decode_step(cls, batch: int,
                  instance: jax.Array | None = None) -> "TokenInfo":
    """One generated token per example (`instance` [B, D]): text, valid,
    causal."""
    return cls.text(valid=jnp.ones((batch, 1), bool),
                    bidirectional=jnp.zeros((batch, 1), bool)).replace(
                        instance=per_token(instance, 1))

  @classmethod
  def concat(cls, parts: "list[TokenInfo]") -> "TokenInfo":
    """Sequences without instance vectors placed one after the other along
    the length axis."""
    join = lambda name: jnp.concatenate([getattr(p, name) for p in parts],
                                        axis=1)
    return cls(is_image=join("is_image"), valid=join("valid"),
               bidirectional=join("bidirectional"))


def token_matmul(x: jax.Array, w: jax.Array, **dot_options) -> jax.Array:
  """x [..., d] @ w [d, n], its leading (batch, token) axes as one.

  The same product, but its weight gradient then contracts one axis, not
  two. Over [B, T] XLA on CPU lays out the output gradient with a
  transposing copy that, for a low-rank w, costs more than the product
  itself (a LoRA step on CPU: 2.2x faster flattened, docs/performance.md).
  """
  flat = x.reshape(-1, x.shape[-1])
  return jnp.dot(flat, w, **dot_options).reshape(x.shape[:-1] + w.shape[1:])


class Dense(nnx.Module):
  """y = x W (+ b) (+ the outputs of its adapters, if it has any).

  Adapters (set by `experts/attach.py`, at `<layer>/adapters/<name>`) are
  called as `adapter(x, tokens, base)`; their outputs add before the bias.
  """

  def __init__(self, in_features: int, out_features: int, *, axes: Axes,
               use_bias: bool, rngs: nnx.Rngs):
    if len(axes) != 2:
      raise ValueError(f"A kernel needs 2 logical axes, got {axes}.")
    self.in_features = in_features
    self.out_features = out_features
    self.axes = tuple(axes)
    init = jax.nn.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)),
                            logical_axes=self.axes)
    self.bias = (nnx.Param(jnp.zeros((out_features,)),
                           logical_axes=(axes[1],)) if use_bias else None)
    self.adapters: nnx.Dict | None = nnx.data(None)  # Set by attach.

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    kernel = self.kernel[...]
    y = add_adapters(token_matmul(x.astype(kernel.dtype), kernel),
                     self.adapters, x, tokens, kernel)
    if self.bias is not None:
      y = y + self.bias[...]
    return y


@flax.struct.dataclass
class Base:
  """What an adapter sees of the module it is beside, besides its input:
  `y`, its output (x W without the bias for a linear layer), and `kernel`,
  a linear layer's W [in, out] (None beside a block)."""
  y: jax.Array
  kernel: jax.Array | None = None


def add_adapters(y: jax.Array, adapters: nnx.Dict | None, x: jax.Array,
                 tokens: TokenInfo, kernel: jax.Array | None = None
                 ) -> jax.Array:
  """y plus every adapter's output `adapter(x, tokens, Base(y, kernel))`
  (DoRA reweighs W and x W; most need x alone)."""
  if adapters is None:
    return y
  base = Base(y, kernel)
  for adapter in adapters.values():
    y = y + adapter(x, tokens, base).astype(y.dtype)
  return y


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (SigLIP's), computed in float32."""

  def __init__(self, width: int, *, eps: float = 1e-6):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((width,)), logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((width,)), logical_axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(jnp.float32)
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm, in float32: the scale is stored as an offset from 1
  (starting at 0), Gemma checkpoints' layout."""

  def __init__(self, width: int, *, eps: float = 1e-6):
    self.eps = eps
    self.scale = nnx.Param(jnp.zeros((width,)), logical_axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) +
                          self.eps)
    return (y * (1 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *,
               max_wavelength: float) -> jax.Array:
  """Rotary position embedding of x [B, T, heads, D] at positions [B, T],
  in Gemma's layout: dimension i of the first half pairs with dimension i
  of the second half (not interleaved)."""
  half = x.shape[-1] // 2
  timescale = max_wavelength**(2 * jnp.arange(half) / x.shape[-1])
  radians = positions[..., None, None].astype(jnp.float32) / timescale
  sin, cos = jnp.sin(radians), jnp.cos(radians)        # [B, T, 1, D/2]
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate(
      [first * cos - second * sin, second * cos + first * sin],
      axis=-1).astype(x.dtype)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap): Gemma 2's smooth bound on logits; 0 = no cap."""
  return cap * jnp.tanh(x / cap) if cap else x


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
           *, scale: float, logit_cap: float = 0.0) -> jax.Array:
  """Scaled dot-product attention with grouped key/value heads -> [B, T, H, D].

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, S, K, D] keys and values; K divides H, and query head h reads
      key/value head h // (H // K) (multi-query when K = 1).
    mask: bool [B, T, S], True where query t may attend to key s; None
      means every query sees every key.
    scale: multiplies the q.k logits (D**-0.5 usually).
    logit_cap: soft cap on the scaled logits (Gemma 2); 0 = none.
  """
  batch, length, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32) * scale
  logits = softcap(logits, logit_cap)
  if mask is not None:
    # A finite floor, not -inf: a query that may see nothing (padding) gets a
    # harmless uniform average instead of NaNs that would poison gradients.
    logits = jnp.where(mask[:, None, None], logits,
                       jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, length, heads, dim)


class Attention(nnx.Module):
  """Multi-head attention; key/value heads may be fewer than query heads.

  q and o use the fused `heads` axis (num_heads * head_dim), k and v the
  fused `kv` axis. RoPE rotates queries and keys when `rope_max_wavelength`
  is set (the decoder; the ViT adds learned positions). Logits are scaled
  by `query_scale` (default head_dim**-0.5) and soft-capped at `logit_cap`.
  """

  def __init__(self, width: int, *, num_heads: int, num_kv_heads: int,
               head_dim: int, use_bias: bool,
               rope_max_wavelength: float | None, rngs: nnx.Rngs,
               query_scale: float | None = None, logit_cap: float = 0.0):
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_max_wavelength = rope_max_wavelength
    self.query_scale = query_scale or head_dim**-0.5
    self.logit_cap = logit_cap
    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim

    linear = functools.partial(Dense, use_bias=use_bias, rngs=rngs)
    self.q = linear(width, q_dim, axes=("embed", "heads"))
    self.k = linear(width, kv_dim, axes=("embed", "kv"))
    self.v = linear(width, kv_dim, axes=("embed", "kv"))
    self.o = linear(q_dim, width, axes=("heads", "embed"))

  def __call__(self, x: jax.Array, tokens: TokenInfo, mask: jax.Array | None,
               *, positions: jax.Array | None = None,
               kv: tuple[jax.Array, jax.Array] | None = None,
               index: jax.Array | int = 0,
               context: tuple[jax.Array, TokenInfo] | None = None):
    """Attends x [B, T, width] (TokenInfo `tokens`) to itself, to a
    key/value cache, or to another sequence, under `mask` bool [B, T, S].

    Args:
      positions: int [B, T] RoPE positions (unused without RoPE).
      kv: optional cache (k, v), each [B, S, K, D]; this call's keys and
        values are written into it from slot `index` before attending.
      context: optional (features [B, S, width], their TokenInfo): keys and
        values come from them instead of x (cross-attention).

    Returns:
      (y [B, T, width], (k, v)): the keys and values attended to (the
      updated cache, or this call's own).
    """
    batch, length, _ = x.shape
    source, source_tokens = context if context is not None else (x, tokens)
    split = lambda y, n: y.reshape(batch, y.shape[1], n, self.head_dim)
    q = split(self.q(x, tokens), self.num_heads)
    k = split(self.k(source, source_tokens), self.num_kv_heads)
    v = split(self.v(source, source_tokens), self.num_kv_heads)
    if self.rope_max_wavelength is not None:
      rope = lambda y: apply_rope(y, positions,
                                  max_wavelength=self.rope_max_wavelength)
      q, k = rope(q), rope(k)
    if kv is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
    out = attend(q, k, v, mask, scale=self.query_scale,
                 logit_cap=self.logit_cap).reshape(batch, length, -1)
    out = constrain(out, ("batch", "length", "heads"))
    return self.o(out, tokens), (k, v)


_GELU_C = (2 / math.pi)**0.5


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (SigLIP's and Gemma's): jax.nn.gelu's values.

  Its gradient keeps only x for the backward pass: differentiated as
  written, the tanh form keeps several arrays of the MLP's widest
  activation per layer, slower than recomputing (a LoRA step on CPU: 7%).
  """
  return jax.nn.gelu(x, approximate=True)


def _gelu_forward(x):
  return gelu(x), x


def _gelu_backward(x, grad):
  # d/dx 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3).
  t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
  slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (
      1 + 3 * 0.044715 * x * x)
  return (grad * slope,)


gelu.defvjp(_gelu_forward, _gelu_backward)


class MlpBlock(nnx.Module):
  """What the two MLP blocks share: their widths, for experts that attach
  to or replace a block, and adapters beside it (as `Dense`'s), whose
  outputs on the block's input add to its output.

  Attributes:
    activation: the key of MLPS; sparse MoE experts mirror the layout.
    in_features, mlp_dim, out_features: the block's widths.
    causal: no token's output may depend on a later token (the decoder's
      blocks): a replacement's routing must respect it.
  """
  activation: str

  def _set_shape(self, width: int, mlp_dim: int, out_features: int | None,
                 causal: bool):
    self.in_features = width
    self.mlp_dim = mlp_dim
    self.out_features = out_features or width
    self.causal = causal
    self.adapters: nnx.Dict | None = nnx.data(None)  # Set by attach.


class Mlp(MlpBlock):
  """The ViT's MLP: fc2(gelu(fc1(x))), with biases (SigLIP layout); also the
  `mlp` connector's (LLaVA's), which maps to `out_features` (default `width`).
  """
  activation = "gelu"

  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs,
               out_features: int | None = None, causal: bool = False):
    self._set_shape(width, mlp_dim, out_features, causal)
    linear = functools.partial(Dense, use_bias=True, rngs=rngs)
    self.fc1 = linear(width, mlp_dim, axes=("embed", "mlp"))
    self.fc2 = linear(mlp_dim, self.out_features, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array, tokens: TokenInfo):
    hidden = gelu(self.fc1(x, tokens))
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return add_adapters(self.fc2(hidden, tokens), self.adapters, x, tokens)


class GeGLU(MlpBlock):
  """Gemma's MLP: down(gelu(gate(x)) * up(x)), without biases."""
  activation = "geglu"

  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs,
               out_features: int | None = None, causal: bool = False):
    self._set_shape(width, mlp_dim, out_features, causal)
    linear = functools.partial(Dense, use_bias=False, rngs=rngs)
    self.gate = linear(width, mlp_dim, axes=("embed", "mlp"))
    self.up = linear(width, mlp_dim, axes=("embed", "mlp"))
    self.down = linear(mlp_dim, self.out_features, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array, tokens: TokenInfo):
    hidden = gelu(self.gate(x, tokens))
    hidden = constrain(hidden * self.up(x, tokens), ("batch", "length", "mlp"))
    return add_adapters(self.down(hidden, tokens), self.adapters, x, tokens)


# activation -> the dense MLP block with it; sparse MoE experts mirror these
# layouts (`experts/sparse.py`), so they can be upcycled from them.
MLPS = {block.activation: block for block in (Mlp, GeGLU)}
