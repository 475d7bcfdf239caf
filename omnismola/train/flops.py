r"""Training FLOPs of one example, from the config alone (no JAX tracing).

MFU needs the FLOPs the model *must* do, not what XLA happens to run, so this
counts matrix products from the config: the model preset, the expert entries
(`config.experts`) and the trainable regex (`config.train.trainable`).

Units: one multiply-add is 2 FLOPs. Only matrix products are counted; norms,
softmax, GELU, RoPE, biases, the loss and the optimizer update are
elementwise and left out (they are a few percent at the widths of interest).

Forward, per example, with N image tokens and L text tokens:

  * every linear layer: 2·d_in·d_out per token it sees: each vision
    encoder over its own patches (patch embedding included, a Dense over
    p·p·3 pixels), the connector over N tokens, the decoder over N + L, the
    tied output logits (2·width·vocab) over the L text positions only;
  * attention, per layer: 2·S²·H·D for the scores q·kᵀ and again for the
    values p·v (S tokens, H query heads of size D). The full S × S square is
    counted because the model computes it; masked entries are not skipped.
    MoVE's cross-attention (N queries over an encoder's P patches) costs
    2·N·P·H·D each, its adaptive pooling two products with constant
    matrices, its router (none with `move.mixer='add'`) two linears on one
    vector per example;
  * LoRA of rank r on a linear: x·A then h·B, 2·r·(d_in + d_out) per token;
  * SMoLA, as `experts/smola.py` computes it, per pool of n experts with p
    slots each, rank r, on every token of the layer (masks multiply, they do
    not skip): router logits 2·d_in·n·p; x·A_cat and h·B_cat
    2·n·r·(d_in + d_out); Soft MoE dispatch (slots from tokens) and combine
    (tokens from slots), both in rank space, 2·n·p·r each;
  * a sparse MoE block (`sparse_moe`, replacing an MLP block) on every
    token: its router 2·width·E, and k times the replaced dense MLP's
    products (each token's k expert copies), and once more with
    `dense_fallback` (its dense MLP runs on every token). Dispatch is left
    out: the one-hot einsums of capacity dispatch, the padding rows of
    blocked dropless dispatch, the gate-weighted sum; and the count is the
    same whatever the capacity factor (as if no copy were dropped);
  * routed LoRA experts (`sparse_lora`, beside a linear layer or an MLP
    block): the router, 2·d_in·E per token, or 2·width·E once per example
    with instance routing (on the prompt's mean embedding); x·A·B of the k
    active experts, 2·k·r·(d_in + d_out) per token; and the global expert's
    2·r·(d_in + d_out). The module computes every expert's rank block and
    weighs the unchosen ones 0; that work is left out as not needed.

Backward. A product C = X·Y needs dX = dC·Yᵀ only if X depends on a trained
parameter, and dY = Xᵀ·dC only if Y does; each costs what the forward
product cost. So each product adds its forward FLOPs once per operand that
depends on a trained parameter:

  * weight gradients (2·P per token) for trained weights only: frozen
    weights need none;
  * activation gradients (2·P per token) only downstream of the first
    trained parameter: with a frozen ViT and adapters only in the decoder
    there is no backward through the ViT or the connector at all, nor
    through the first decoder layer's q/k/v/gate/up base weights (their
    input, the embeddings, depends on nothing trained).

This is also what JAX differentiates when frozen parameters are closed over
rather than differentiated (`trainer.split_model`), and what XLA keeps after
dead-code elimination. Full training therefore costs about 3× the forward;
adapter-only training about 2× the decoder's forward plus the adapters.
"""
import dataclasses
import math
import re
from typing import Callable, Sequence

from omnismola.experts import attach
from omnismola.experts import sparse
from omnismola.models.vlm import VLMConfig

# bf16 dense peak FLOP/s by `jax.Device.device_kind` substring, first match
# wins (so "H100 PCIe" before "H100"). MFU is against this peak whatever the
# step's dtype, as MFU is conventionally reported.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    # NVIDIA H100 datasheet: PCIe 1,513 TFLOPS bf16 with 2:4 sparsity, dense
    # is half; SXM 1,979 with sparsity -> 989 dense.
    # https://www.nvidia.com/en-us/data-center/h100/
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    # NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity, as the H100 SXM.
    # https://www.nvidia.com/en-us/data-center/h200/
    ("H200", 989e12),
    # NVIDIA A100 datasheet: 312 TFLOPS bf16 dense.
    # https://www.nvidia.com/en-us/data-center/a100/
    ("A100", 312e12),
    # Google Cloud TPU system architecture pages, bf16 peak per chip:
    # https://cloud.google.com/tpu/docs/v4 (275),
    # https://cloud.google.com/tpu/docs/v5e (197; device_kind "TPU v5 lite"),
    # https://cloud.google.com/tpu/docs/v5p (459).
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The bf16 dense peak FLOP/s of a device kind, or None when unknown."""
  return next((peak for key, peak in PEAK_FLOPS if key in device_kind), None)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak."""
  return flops_per_step / (step_seconds * num_devices * peak)


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One matrix product of a training step, per example.

  Attributes:
    name: where it happens, e.g. "decoder/layers/0/attn/q".
    forward: forward FLOPs (2 × multiply-adds).
    grads: how many of its two operands depend on a trained parameter; the
      backward pass computes that many gradients, each at the forward cost.
  """
  name: str
  forward: int
  grads: int

  @property
  def backward(self) -> int:
    return self.forward * self.grads


def _product(name: str, multiply_adds: int, lhs: bool, rhs: bool) -> Matmul:
  """X·Y; lhs/rhs: whether X/Y depends on a trained parameter."""
  return Matmul(name, 2 * multiply_adds, int(lhs) + int(rhs))


@dataclasses.dataclass(frozen=True)
class _Model:
  """What decides the count besides shapes: adapters and the trained set."""
  specs: Sequence[attach.ExpertSpec]
  trainable: re.Pattern
  instance_width: int  # Of `TokenInfo.instance`: the decoder's width.

  def trained(self, *paths: str) -> bool:
    return any(self.trainable.fullmatch(p) for p in paths)

  @property
  def instance_dep(self) -> bool:
    """Whether `TokenInfo.instance`, the prompt's mean embedding, depends
    on a trained parameter."""
    return self.trained("decoder/embedder/embedding")

  def matching(self, sort: str, path: str) -> list[tuple[int, attach.ExpertSpec]]:
    """(index, spec) of the entries attaching to the `sort` module at `path`
    (as `attach.ExpertFactory` matches them)."""
    return [(i, s) for i, s in enumerate(self.specs)
            if sort in s.sorts and re.fullmatch(s.targets, path)]


def _lora(model, path, d_in, d_out, tokens, x_dep, *, rank, alpha=None):
  """LoRA's x·A, h·B (see experts/lora.py)."""
  del alpha  # A scalar multiplier.
  a, b = model.trained(f"{path}/a"), model.trained(f"{path}/b")
  return [_product(f"{path}/a", tokens * d_in * rank, x_dep, a),
          _product(f"{path}/b", tokens * rank * d_out, x_dep or a, b)
          ], x_dep or a or b


def _smola(model, path, d_in, d_out, tokens, x_dep, *, pools, rank,
           slots_per_expert=1, alpha=None):
  """Every product of experts/smola.py's `mix_pools`, pool by pool.

  The fused x·[A_cat | router] and h·B_cat products are split by pool here:
  the same FLOPs, and the same gradients as long as the pools are all
  trained or all frozen.
  """
  del alpha  # A scalar multiplier.
  ops, y_dep = [], x_dep
  for modality in sorted(m for m, n in pools.items() if n > 0):
    pool = f"{path}/pools/{modality}"
    n, slots = pools[modality], pools[modality] * slots_per_expert
    phi = model.trained(f"{pool}/phi", f"{pool}/scale")
    a, b = model.trained(f"{pool}/a"), model.trained(f"{pool}/b")
    route = x_dep or phi  # Router logits, dispatch and combine weights.
    h = x_dep or a
    ops += [
        _product(f"{pool}/router", tokens * d_in * slots, x_dep, phi),
        _product(f"{pool}/a", tokens * d_in * n * rank, x_dep, a),
        _product(f"{pool}/dispatch", tokens * slots * rank, route, h),
        _product(f"{pool}/combine", tokens * slots * rank, route, route or h),
        _product(f"{pool}/b", tokens * n * rank * d_out, route or h, b),
    ]
    y_dep = y_dep or phi or a or b
  return ops, y_dep


def _sparse_lora(model, path, d_in, d_out, tokens, x_dep, *, num_experts,
                 rank, top_k=1, routing="instance", global_expert=False,
                 learned_scale=False, activation=None, share_gate=False,
                 alpha=None):
  """experts/sparse_lora.py: router, the k active experts, global expert.

  A shared gate (`share_gate`) is one router module run by every layer that
  shares it, so each layer still counts its router product.
  """
  del activation, share_gate, alpha  # Elementwise, or no product.
  router = model.trained(f"{path}/router/kernel")
  a, b = model.trained(f"{path}/experts/a"), model.trained(f"{path}/experts/b")
  if routing == "instance":  # One decision per example, on its prompt.
    router_op = _product(f"{path}/router",
                         model.instance_width * num_experts,
                         model.instance_dep, router)
    route = model.instance_dep or router  # The experts' weights.
  else:
    router_op = _product(f"{path}/router", tokens * d_in * num_experts,
                         x_dep, router)
    route = x_dep or router
  ops = [router_op,
         _product(f"{path}/experts/a", tokens * d_in * rank * top_k, x_dep, a),
         _product(f"{path}/experts/b", tokens * rank * d_out * top_k,
                  x_dep or a or route, b)]
  y_dep = x_dep or route or a or b or (
      learned_scale and model.trained(f"{path}/scale"))
  if global_expert:
    ga = model.trained(f"{path}/global_expert/a")
    gb = model.trained(f"{path}/global_expert/b")
    ops += [_product(f"{path}/global_expert/a", tokens * d_in * rank, x_dep,
                     ga),
            _product(f"{path}/global_expert/b", tokens * rank * d_out,
                     x_dep or ga or route, gb)]
    y_dep = y_dep or ga or gb
  return ops, y_dep


_ADAPTERS: dict[str, Callable[..., tuple[list[Matmul], bool]]] = {
    "lora": _lora,
    "smola": _smola,
    "sparse_lora": _sparse_lora,
}


def _adapters(model, sort, path, d_in, d_out, tokens, x_dep):
  """(products, output depends on a trained parameter) of the adapters
  beside the `sort` module at `path`, at `<path>/adapters/<kind>_<i>`."""
  ops, y_dep = [], False
  for i, spec in model.matching(sort, path):
    if attach.KINDS[spec.kind].replaces:
      continue  # Counted by `_mlp_block`.
    if spec.kind not in _ADAPTERS:
      raise ValueError(f"No FLOP count for expert kind {spec.kind!r}; "
                       f"counted kinds: {sorted(_ADAPTERS)} and "
                       f"{sorted(_REPLACEMENTS)}.")
    more, dep = _ADAPTERS[spec.kind](
        model, f"{path}/adapters/{spec.name(i)}", d_in, d_out, tokens, x_dep,
        **spec.options)
    ops += more
    y_dep = y_dep or dep
  return ops, y_dep


def _linear(model, path, d_in, d_out, tokens, x_dep, *, bias: bool):
  """(products, output depends on a trained parameter) of one linear layer.

  Mirrors `attach.ExpertFactory.linear`: the Dense (`<path>/kernel`) plus
  the adapters whose targets match its path.
  """
  kernel = model.trained(f"{path}/kernel")
  ops = [_product(path, tokens * d_in * d_out, x_dep, kernel)]
  more, adapters_dep = _adapters(model, attach.LINEAR, path, d_in, d_out,
                                 tokens, x_dep)
  return ops + more, (x_dep or kernel or adapters_dep or
                      (bias and model.trained(f"{path}/bias")))


def _mlp_layers(layer, activation, width, mlp_dim, d_out, x_dep):
  """(products, output dep) of an MLP's layers (`sparse.ACTIVATIONS`): those
  reading the block's input map width -> mlp_dim, the others mlp_dim ->
  d_out. `layer(name, d_in, d_out, x_dep, bias)` gives one layer's
  (products, output dep)."""
  ops, hidden_dep, y_dep = [], False, False
  for name, from_width, bias in sparse.ACTIVATIONS[activation]:
    if from_width:
      more, dep = layer(name, width, mlp_dim, x_dep, bias)
      hidden_dep = hidden_dep or dep
    else:
      more, y_dep = layer(name, mlp_dim, d_out, hidden_dep, bias)
    ops += more
  return ops, y_dep


def _mlp_block(model, path, width, mlp_dim, tokens, x_dep, *, activation,
               out_features=None):
  """(products, output dep) of an MLP block, as `attach.ExpertFactory.mlp`
  builds it: the kind that replaces it, else the dense block's linear
  layers (with their own adapters) and the adapters beside the block."""
  d_out = out_features or width
  for _, spec in model.matching(attach.BLOCK, path):
    if attach.KINDS[spec.kind].replaces:
      if spec.kind not in _REPLACEMENTS:
        raise ValueError(f"No FLOP count for expert kind {spec.kind!r}; "
                         f"counted kinds: {sorted(_ADAPTERS)} and "
                         f"{sorted(_REPLACEMENTS)}.")
      return _REPLACEMENTS[spec.kind](model, path, width, mlp_dim, d_out,
                                      tokens, x_dep, activation=activation,
                                      **spec.options)
  dense = lambda name, d_in, d_out, x_dep, bias: _linear(
      model, f"{path}/{name}", d_in, d_out, tokens, x_dep, bias=bias)
  ops, y_dep = _mlp_layers(dense, activation, width, mlp_dim, d_out, x_dep)
  beside, beside_dep = _adapters(model, attach.BLOCK, path, width, d_out,
                                 tokens, x_dep)
  return ops + beside, y_dep or beside_dep


def _sparse_moe(model, path, width, mlp_dim, d_out, tokens, x_dep, *,
                activation, top_k=2, num_experts=None, pools=None,
                dense_fallback=False, **dispatch_options):
  """experts/sparse.py's router, each token's k expert MLPs (weights at
  `<path>/layers/<name>/`) and, with `dense_fallback`, the dense MLP on
  every token (weights at `<path>/<name>/`); dispatch not counted (module
  docstring)."""
  del dispatch_options  # Capacity, dispatch kind, tile...: no products.
  experts = num_experts or sum(pools.values())
  router = model.trained(f"{path}/router")

  def mlp_layers(weights, label, copies):
    """(products, output dep) of `copies` MLPs per token whose layer <name>
    has its weights at `<weights>/<name>`; products named `<label>/<name>`."""

    def layer(name, d_in, d_out, x_dep, bias):
      kernel = model.trained(f"{weights}/{name}/kernel")
      bias_dep = bias and model.trained(f"{weights}/{name}/bias")
      return [_product(f"{label}/{name}", copies * tokens * d_in * d_out,
                       x_dep, kernel)], x_dep or kernel or bias_dep

    return _mlp_layers(layer, activation, width, mlp_dim, d_out, x_dep)

  ops, y_dep = mlp_layers(f"{path}/layers", path, top_k)
  if dense_fallback:  # Its products named apart from the experts'.
    dense_ops, dense_dep = mlp_layers(path, f"{path}/dense", 1)
    ops, y_dep = ops + dense_ops, y_dep or dense_dep
  return [_product(f"{path}/router", tokens * width * experts, x_dep,
                   router)] + ops, y_dep or router


_REPLACEMENTS: dict[str, Callable[..., tuple[list[Matmul], bool]]] = {
    "sparse_moe": _sparse_moe,
}


def _attention(model, path, width, tokens, x_dep, *, heads, kv_heads,
               head_dim, bias, keys=None, key_dep=None):
  """q/k/v projections, scores, values and the output projection.

  Self-attention over `tokens`, or with `keys` cross-attention from the
  `tokens` queries to `keys` other tokens whose input depends on a trained
  parameter iff `key_dep` (MoVE's ADT).
  """
  if keys is None:
    keys, key_dep = tokens, x_dep
  q, q_dep = _linear(model, f"{path}/q", width, heads * head_dim, tokens,
                     x_dep, bias=bias)
  k, k_dep = _linear(model, f"{path}/k", width, kv_heads * head_dim, keys,
                     key_dep, bias=bias)
  v, v_dep = _linear(model, f"{path}/v", width, kv_heads * head_dim, keys,
                     key_dep, bias=bias)
  square = tokens * keys * heads * head_dim
  core = [_product(f"{path}/scores", square, q_dep, k_dep),
          _product(f"{path}/values", square, q_dep or k_dep, v_dep)]
  o, o_dep = _linear(model, f"{path}/o", heads * head_dim, width, tokens,
                     q_dep or k_dep or v_dep, bias=bias)
  return q + k + v + core + o, o_dep


def _norm_trained(model, path):
  return model.trained(f"{path}/scale", f"{path}/bias")


def _gelu_mlp(model, path, config, tokens, x_dep):
  """A ViT-layout MLP block (fc1, fc2) at `path`, or what replaces it."""
  return _mlp_block(model, path, config.width, config.mlp_dim, tokens, x_dep,
                    activation="gelu")


def _vit(model, config, tokens, name="vit"):
  """(products, output depends on a trained parameter) of the ViT `name`."""
  ops, dep = _linear(model, f"{name}/embedding", config.patch_size**2 * 3,
                     config.width, tokens, False, bias=True)
  dep = dep or model.trained(f"{name}/pos_embedding")
  for i in range(config.depth):
    path = f"{name}/layers/{i}"
    x_dep = dep or _norm_trained(model, f"{path}/norm1")
    attn, attn_dep = _attention(
        model, f"{path}/attn", config.width, tokens, x_dep,
        heads=config.num_heads, kv_heads=config.num_heads,
        head_dim=config.width // config.num_heads, bias=True)
    dep = dep or attn_dep
    x_dep = dep or _norm_trained(model, f"{path}/norm2")
    mlp, mlp_dep = _gelu_mlp(model, f"{path}/mlp", config, tokens, x_dep)
    ops += attn + mlp
    dep = dep or mlp_dep
  return ops, dep or _norm_trained(model, f"{name}/norm")


def _move_branch(model, path, vit, num_tokens, adt_depth, out_width,
                 feature_dep):
  """One MoVE branch (models/connectors.py `MoVEBranch`): adaptive pooling
  of the encoder's grid (two products with constant pooling matrices), the
  ADT layers over the L pooled tokens, each cross-attending to the encoder's
  N tokens, and the projection to the decoder width."""
  grid, side = vit.image_size // vit.patch_size, math.isqrt(num_tokens)
  ops = [_product(f"{path}/pool_rows", side * grid * grid * vit.width,
                  False, feature_dep),
         _product(f"{path}/pool_cols", side * side * grid * vit.width,
                  False, feature_dep)]
  heads = dict(heads=vit.num_heads, kv_heads=vit.num_heads,
               head_dim=vit.width // vit.num_heads, bias=True)
  dep = feature_dep
  for i in range(adt_depth):
    layer = f"{path}/layers/{i}"
    attn, attn_dep = _attention(
        model, f"{layer}/self_attn", vit.width, num_tokens,
        dep or _norm_trained(model, f"{layer}/norm1"), **heads)
    dep = dep or attn_dep
    cross, cross_dep = _attention(
        model, f"{layer}/cross_attn", vit.width, num_tokens,
        dep or _norm_trained(model, f"{layer}/norm2"),
        keys=vit.num_patches, key_dep=feature_dep, **heads)
    dep = dep or cross_dep
    mlp, mlp_dep = _gelu_mlp(model, f"{layer}/mlp", vit, num_tokens,
                             dep or _norm_trained(model, f"{layer}/norm3"))
    ops += attn + cross + mlp
    dep = dep or mlp_dep
  proj, proj_dep = _linear(model, f"{path}/proj", vit.width, out_width,
                           num_tokens, dep or _norm_trained(
                               model, f"{path}/norm"), bias=True)
  return ops + proj, proj_dep


def _connector(model, config, encoder_deps, instance_dep):
  """(products, output depends on a trained parameter) of the connector.

  `encoder_deps`: {encoder name: its features depend on a trained
  parameter}; `instance_dep`: the same for the prompt's mean embedding
  (MoVE's router input).
  """
  width, tokens = config.decoder.width, config.num_image_tokens
  if config.connector == "linear":
    return _linear(model, "connector/proj", config.vit.width, width, tokens,
                   encoder_deps["vit"], bias=True)
  if config.connector == "mlp":
    return _mlp_block(model, "connector/mlp", config.vit.width, width,
                      tokens, encoder_deps["vit"], activation="gelu",
                      out_features=width)
  if config.connector != "move":
    raise ValueError(f"No FLOP count for connector {config.connector!r}.")
  ops, dep = [], False
  if config.move.mixer == "router":
    router = "connector/router"
    hidden_width = config.move.router_dim or width
    hidden, hidden_dep = _linear(model, f"{router}/hidden", width,
                                 hidden_width, 1, instance_dep, bias=True)
    out, dep = _linear(model, f"{router}/out", hidden_width,
                       len(config.encoders), 1, hidden_dep, bias=True)
    ops = hidden + out
  for name, vit in config.encoders.items():
    branch, branch_dep = _move_branch(
        model, f"connector/{name}", vit, tokens, config.move.adt_depth, width,
        encoder_deps[name])
    ops += branch
    dep = dep or branch_dep
  return ops, dep


def _decoder(model, config, image_tokens, text_tokens, image_dep):
  """(products) of the decoder over [image, text] and the text logits."""
  tokens = image_tokens + text_tokens
  embedding = model.trained("decoder/embedder/embedding")
  dep, ops = image_dep or embedding, []
  for i in range(config.depth):
    path = f"decoder/layers/{i}"
    x_dep = dep or model.trained(f"{path}/pre_attn_norm/scale")
    attn, attn_dep = _attention(
        model, f"{path}/attn", config.width, tokens, x_dep,
        heads=config.num_heads, kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, bias=False)
    dep = dep or attn_dep
    x_dep = dep or model.trained(f"{path}/pre_mlp_norm/scale")
    mlp, mlp_dep = _mlp_block(model, f"{path}/mlp", config.width,
                              config.mlp_dim, tokens, x_dep,
                              activation="geglu")
    ops += attn + mlp
    dep = dep or mlp_dep
  dep = dep or model.trained("decoder/final_norm/scale")
  logits = _product("decoder/logits",
                    text_tokens * config.width * config.vocab_size, dep,
                    embedding)
  return ops + [logits]


def train_matmuls(config: VLMConfig, experts, trainable: str,
                  text_len: int, images: int = 1) -> list[Matmul]:
  """Every matrix product of one training row, in forward order.

  Args:
    config: the backbone (e.g. `build.vlm_config(config.model)`).
    experts: `config.experts` entries.
    trainable: `config.train.trainable`, regex over parameter paths.
    text_len: L, text tokens per row (prefix + suffix, padding included:
      the model computes on padding too).
    images: image slots per row: 1, or M for packed rows (row_layout.py),
      whose M images are all encoded (empty slots too) and whose decoder
      runs over M N image tokens. Instance routers, which packed rows apply
      per token, stay counted once per image (2·width·E per token more:
      negligible beside the layers).
  """
  model = _Model(
      specs=[attach.ExpertSpec.parse(i, e) for i, e in enumerate(experts)],
      trainable=re.compile(trainable), instance_width=config.decoder.width)
  encoders, encoder_deps = [], {}
  for name, vit in config.encoders.items():
    ops, encoder_deps[name] = _vit(model, vit, vit.num_patches, name)
    encoders += ops
  connector, image_dep = _connector(model, config, encoder_deps,
                                    instance_dep=model.instance_dep)
  return (encoders + connector) * images + _decoder(
      model, config.decoder, images * config.num_image_tokens, text_len,
      image_dep)


@dataclasses.dataclass(frozen=True)
class TrainFlops:
  """FLOPs of one training row (one example unless packed); `tokens` =
  image + text tokens."""
  forward: int
  backward: int
  tokens: int

  @property
  def total(self) -> int:
    return self.forward + self.backward

  @property
  def per_token(self) -> float:
    return self.total / self.tokens


def train_flops(config: VLMConfig, experts, trainable: str,
                text_len: int, images: int = 1) -> TrainFlops:
  """Forward and backward FLOPs per row (see the module docstring and
  `train_matmuls`)."""
  ops = train_matmuls(config, experts, trainable, text_len, images)
  return TrainFlops(forward=sum(op.forward for op in ops),
                    backward=sum(op.backward for op in ops),
                    tokens=images * config.num_image_tokens + text_len)
