"""Building blocks shared by the vision encoder and the decoder.

* `TokenInfo`: per-position facts (image or text, valid or padding,
  bidirectional or causal), derived once per forward pass and handed to every
  linear layer, so experts can route by modality and attention group.
* `Dense`: the linear layer, and `Mlp`, `GeGLU`: the two MLP blocks (GELU
  for the ViT and the connector, GeGLU for the decoder). The backbone builds
  them as plain children; `experts/attach.py` finds them in the built module
  graph and adds adapters beside them or replaces blocks (sparse MoE), so
  the backbone never names an expert.
* Norms (LayerNorm for the ViT, Gemma's RMSNorm), RoPE and attention with
  grouped key/value heads.

Modules return their outputs only. What routers have to say (their losses,
statistics and usage) is one channel: `report` sows it on the router and
`pop_reports` collects it by module path, once per scanned layer
(models/stack.py) and once for the rest of the model (`VLM.forward`).

Every parameter carries `logical_axes` metadata, one name (or None) per
dimension; `train/partitioning.py` maps the names to mesh axes. Large
activations are named too, with `constrain(x, axes)`: it pins their sharding
while a trainer traces under `activation_sharding(...)` and does nothing
otherwise (a notebook, a test, one device).
"""
import contextlib
import contextvars
import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


# (logical axes, shape) -> jax.sharding.Sharding, or None outside a trainer.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar(
    "activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(to_sharding: Callable[[Axes, tuple[int, ...]], object]):
  """Within this context, `constrain` pins activations to `to_sharding`."""
  token = _ACTIVATION_SHARDING.set(to_sharding)
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """x with the sharding its logical `axes` map to (see module docstring)."""
  to_sharding = _ACTIVATION_SHARDING.get()
  if to_sharding is None:
    return x
  return jax.lax.with_sharding_constraint(x, to_sharding(axes, x.shape))


# True while `recording_usage()` is active (see `record_usage`).
_RECORDING_USAGE: contextvars.ContextVar = contextvars.ContextVar(
    "recording_usage", default=False)


@contextlib.contextmanager
def recording_usage():
  """Within this context, routers keep their per-token expert weights.

  For analysis only (`omnismola.analyze`): training never records, so the
  weights cost nothing there.
  """
  token = _RECORDING_USAGE.set(True)
  try:
    yield
  finally:
    _RECORDING_USAGE.reset(token)


def report(module: nnx.Module, name: str, value) -> None:
  """Hands `value` (a router's losses and statistics, its usage) out of the
  forward pass as the module's report `name`.

  Reports are sown and collected by `pop_reports`, so a router deep inside
  other modules (an adapter inside a linear layer) reports without changing
  what its parents return.
  """
  module.sow(nnx.Intermediate, name, value)


def record_usage(module: nnx.Module, weights: jax.Array) -> None:
  """Reports a router's expert weights [B, T, E] (each token's weight on
  each expert) as its `usage`, while recording."""
  if _RECORDING_USAGE.get():
    report(module, "usage", weights)


def pop_reports(module: nnx.Module, prefix: str = "") -> dict[str, dict]:
  """Removes what the routers inside `module` reported and returns it.

  Returns {router path: {report name: value}}, the router path relative to
  `module` under `prefix`; {} when nothing reported. The model's forward
  pass returns these (`VLM.forward`): `routing` (a sparse MoE's losses and
  statistics, `MoEAux`) and, while recording, `usage`.
  """
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
      (vision encoder tokens; the decoder's image + prefix). Causal tokens are
      valid tokens that are not bidirectional.
    instance: float [B, T, D] or None: each token's copy of its example's
      vector for instance-level routers, the mean embedding of the
      example's prompt (see `VLM`). It is fixed before the first generated
      token, so instance routing decides once per example and never
      changes while decoding. Per token, so that packed rows (several
      examples per row) need no other shape.
    segment: int [B, T] or None: the example (1 to `num_segments`; 0 on
      padding) each token belongs to; a row holds one example unless
      packed. None: one example per row (e.g. a decoding step).
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
    one): a row's bidirectional tokens (G = 1), or in packed rows each
    example's (G = num_segments)."""
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
    where `rows` (bool [B]) holds, all rows by default (an empty image slot
    of a packed row is a row without a valid token). `instance` [B, D] is
    each row's example vector (one image, one example)."""
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

  Adapters (`experts/attach.py` sets `adapters` after the backbone is
  built) are modules called as `adapter(x, tokens, base)` whose outputs
  are added to the layer's (before its bias); they live in
  `<layer>/adapters/<name>`, so the layer's own parameters keep their paths
  with or without them and pretrained checkpoints load either way.
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
  """What an adapter sees of the module it is beside, besides its input.

  Attributes:
    y: the module's output: x W for a linear layer (without its bias), the
      block's output for an MLP block.
    kernel: the linear layer's kernel W [in, out]; None beside a block.
  """
  y: jax.Array
  kernel: jax.Array | None = None


def add_adapters(y: jax.Array, adapters: nnx.Dict | None, x: jax.Array,
                 tokens: TokenInfo, kernel: jax.Array | None = None
                 ) -> jax.Array:
  """y plus every adapter's output on the module's input x (None: y).

  Adapters are called as `adapter(x, tokens, Base(y, kernel))`: most need x
  alone; some reweigh what the module computes (DoRA needs W and x W).
  """
  if adapters is None:
    return y
  base = Base(y, kernel)
  for adapter in adapters.values():
    y = y + adapter(x, tokens, base).astype(y.dtype)
  return y


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (the ViT's norm, as in SigLIP).

  Statistics are computed in float32 whatever the activation dtype.
  """

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
  """Gemma's RMSNorm: the scale is stored as an offset from 1 and starts at 0.

  Storing (scale - 1) keeps the layout of Gemma checkpoints, so they load
  without rewriting. Computed in float32, as Gemma's reference code does.
  """

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
  """Rotary position embedding of x [B, T, heads, D] at positions [B, T].

  Gemma's layout: dimension i of the first half pairs with dimension i of
  the second half (not interleaved), so Gemma checkpoints load as they are.
  """
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
  """Scaled dot-product attention with grouped key/value heads.

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, S, K, D] keys and values; K divides H, and query head h reads
      key/value head h // (H // K) (multi-query when K = 1).
    mask: bool [B, T, S], True where query t may attend to key s; None
      means every query sees every key.
    scale: multiplies the q.k logits (D**-0.5 usually).
    logit_cap: soft cap on the scaled logits (Gemma 2); 0 = none.

  Returns:
    [B, T, H, D].
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
  fused `kv` axis (num_kv_heads * head_dim). With `rope_max_wavelength`
  set, queries and keys are rotated by RoPE at the given positions (decoder);
  with None there is no position information here (the ViT adds its own).
  Logits are scaled by `query_scale` (default head_dim**-0.5; Gemma 2 uses
  query_pre_attn_scalar**-0.5) and soft-capped at `logit_cap` if nonzero.
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

    linear = lambda n_in, n_out, axes: Dense(n_in, n_out, axes=axes,
                                             use_bias=use_bias, rngs=rngs)
    self.q = linear(width, q_dim, ("embed", "heads"))
    self.k = linear(width, kv_dim, ("embed", "kv"))
    self.v = linear(width, kv_dim, ("embed", "kv"))
    self.o = linear(q_dim, width, ("heads", "embed"))

  def __call__(self, x: jax.Array, tokens: TokenInfo, mask: jax.Array | None,
               *, positions: jax.Array | None = None,
               kv: tuple[jax.Array, jax.Array] | None = None,
               index: jax.Array | int = 0,
               context: tuple[jax.Array, TokenInfo] | None = None):
    """Attends x [B, T, width] to itself, to a key/value cache, or to
    another sequence.

    Args:
      x: [B, T, width] inputs.
      tokens: TokenInfo [B, T] of x, handed to the linear layers.
      mask: bool [B, T, S] (S = T without a cache, the cache length with one).
      positions: int [B, T] RoPE positions (unused without RoPE).
      kv: optional cache (k, v), each [B, S, K, D]; this call's keys and
        values are written into it at slot `index` before attending.
      index: the cache slot of x's first token.
      context: optional (features [B, S, width], their TokenInfo): keys and
        values come from them instead of x (cross-attention).

    Returns:
      (y [B, T, width], (k, v)): the keys and values attended to, i.e. the
      updated cache, or this call's own keys and values without one.
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

  Its gradient keeps only x for the backward pass. Differentiated as
  written, the tanh form keeps several intermediate arrays of the MLP's
  widest activation per layer; storing and re-reading them took longer
  than recomputing from x (a LoRA step on CPU: 7% faster).
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
  to or replace a block (`experts/attach.py`), and adapters beside it (as
  `Dense`'s, at `<block>/adapters/<name>`), whose outputs on the block's
  input add to its output.

  Attributes:
    activation: the key of MLPS; sparse MoE experts mirror the layout.
    in_features, mlp_dim, out_features: the block's widths.
    causal: some tokens through the block attend causally (the decoder's),
      so no token's output may depend on a later token (a replacement's
      routing must respect it; a dense block is per-token anyway).
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
  """The ViT's MLP: fc2(gelu(fc1(x))), with biases (SigLIP layout).

  Also the `mlp` connector (LLaVA's two-layer GELU projection), which maps
  to another width: `out_features` (default `width`).
  """
  activation = "gelu"

  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs,
               out_features: int | None = None, causal: bool = False):
    self._set_shape(width, mlp_dim, out_features, causal)
    self.fc1 = Dense(width, mlp_dim, axes=("embed", "mlp"), use_bias=True,
                     rngs=rngs)
    self.fc2 = Dense(mlp_dim, self.out_features, axes=("mlp", "embed"),
                     use_bias=True, rngs=rngs)

  def __call__(self, x: jax.Array, tokens: TokenInfo):
    hidden = gelu(self.fc1(x, tokens))
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    y = self.fc2(hidden, tokens)
    return add_adapters(y, self.adapters, x, tokens)


class GeGLU(MlpBlock):
  """Gemma's MLP: down(gelu(gate(x)) * up(x)), without biases."""
  activation = "geglu"

  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs,
               out_features: int | None = None, causal: bool = False):
    self._set_shape(width, mlp_dim, out_features, causal)
    linear = lambda n_in, n_out, axes: Dense(n_in, n_out, axes=axes,
                                             use_bias=False, rngs=rngs)
    self.gate = linear(width, mlp_dim, ("embed", "mlp"))
    self.up = linear(width, mlp_dim, ("embed", "mlp"))
    self.down = linear(mlp_dim, self.out_features, ("mlp", "embed"))

  def __call__(self, x: jax.Array, tokens: TokenInfo):
    hidden = gelu(self.gate(x, tokens))
    hidden = constrain(hidden * self.up(x, tokens), ("batch", "length", "mlp"))
    y = self.down(hidden, tokens)
    return add_adapters(y, self.adapters, x, tokens)


# activation -> the dense MLP block with it; sparse MoE experts mirror these
# layouts (`experts/sparse.py`), so they can be upcycled from them.
MLPS = {block.activation: block for block in (Mlp, GeGLU)}
