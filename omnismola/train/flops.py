r"""Training FLOPs of one example, from the config alone (no JAX tracing).

MFU needs the FLOPs the model *must* do, not what XLA happens to run, so this
counts matrix products from the config: the model preset, the expert entries
(`config.experts`) and the trainable regex (`config.train.trainable`).

Units: one multiply-add is 2 FLOPs. Only matrix products are counted; norms,
softmax, GELU, RoPE, biases, the loss and the optimizer update are
elementwise and left out (they are a few percent at the widths of interest).

Forward, per example, with N image tokens and L text tokens:

  * every linear layer: 2·d_in·d_out per token it sees: the ViT (patch
    embedding included, a Dense over p·p·3 pixels) and the connector over N
    tokens, the decoder over N + L, the tied output logits (2·width·vocab)
    over the L text positions only;
  * attention, per layer: 2·S²·H·D for the scores q·kᵀ and again for the
    values p·v (S tokens, H query heads of size D). The full S × S square is
    counted because the model computes it; masked entries are not skipped;
  * LoRA of rank r on a linear: x·A then h·B, 2·r·(d_in + d_out) per token;
  * SMoLA, as `experts/smola.py` computes it, per pool of n experts with p
    slots each, rank r, on every token of the layer (masks multiply, they do
    not skip): router logits 2·d_in·n·p; Soft MoE dispatch (slots from
    tokens) 2·n·p·d_in and combine (tokens from slots) 2·n·p·d_out; the
    fused per-token path x·A_cat, h·B_cat 2·n·r·(d_in + d_out); and once per
    example the experts on the slots, 2·n·p·r·(d_in + d_out).

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
import re
from typing import Callable, Sequence

from omnismola.experts import attach
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

  def trained(self, *paths: str) -> bool:
    return any(self.trainable.fullmatch(p) for p in paths)


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

  The fused A_cat/B_cat products are split by pool here: the same FLOPs, and
  the same gradients as long as the pools are all trained or all frozen.
  The slot experts' "bnpd,dnr,nro" einsum is counted as slots·A then ·B, the
  order opt_einsum picks when the rank is below the widths.
  """
  del alpha  # A scalar multiplier.
  ops, y_dep = [], x_dep
  for modality in sorted(m for m, n in pools.items() if n > 0):
    pool = f"{path}/pools/{modality}"
    n, slots = pools[modality], pools[modality] * slots_per_expert
    phi = model.trained(f"{pool}/phi", f"{pool}/scale")
    a, b = model.trained(f"{pool}/a"), model.trained(f"{pool}/b")
    route = x_dep or phi  # Router logits, dispatch and combine weights.
    slots_a = route or a
    ops += [
        _product(f"{pool}/router", tokens * d_in * slots, x_dep, phi),
        _product(f"{pool}/dispatch", tokens * slots * d_in, route, x_dep),
        _product(f"{pool}/slots_a", slots * d_in * rank, route, a),
        _product(f"{pool}/slots_b", slots * rank * d_out, slots_a, b),
        _product(f"{pool}/combine", tokens * slots * d_out, route,
                 slots_a or b),
        _product(f"{pool}/a", tokens * d_in * n * rank, x_dep, a),
        _product(f"{pool}/b", tokens * n * rank * d_out, slots_a, b),
    ]
    y_dep = y_dep or phi or a or b
  return ops, y_dep


_ADAPTERS: dict[str, Callable[..., tuple[list[Matmul], bool]]] = {
    "lora": _lora,
    "smola": _smola,
}


def _linear(model, path, d_in, d_out, tokens, x_dep, *, bias: bool):
  """(products, output depends on a trained parameter) of one linear layer.

  Mirrors `attach.LinearFactory`: a layer whose path matches an expert
  entry's `targets` is the base Dense (`<path>/base`) plus the adapters.
  """
  specs = [(i, s) for i, s in enumerate(model.specs)
           if re.fullmatch(s.targets, path)]
  base = f"{path}/base" if specs else path
  kernel = model.trained(f"{base}/kernel")
  ops = [_product(path, tokens * d_in * d_out, x_dep, kernel)]
  y_dep = x_dep or kernel or (bias and model.trained(f"{base}/bias"))
  for i, spec in specs:
    if spec.kind not in _ADAPTERS:
      raise ValueError(f"No FLOP count for expert kind {spec.kind!r}; "
                       f"counted kinds: {sorted(_ADAPTERS)}.")
    more, dep = _ADAPTERS[spec.kind](
        model, f"{path}/adapters/{spec.name(i)}", d_in, d_out, tokens, x_dep,
        **spec.options)
    ops += more
    y_dep = y_dep or dep
  return ops, y_dep


def _attention(model, path, width, tokens, x_dep, *, heads, kv_heads,
               head_dim, bias):
  """q/k/v projections, scores, values and the output projection."""
  q, q_dep = _linear(model, f"{path}/q", width, heads * head_dim, tokens,
                     x_dep, bias=bias)
  k, k_dep = _linear(model, f"{path}/k", width, kv_heads * head_dim, tokens,
                     x_dep, bias=bias)
  v, v_dep = _linear(model, f"{path}/v", width, kv_heads * head_dim, tokens,
                     x_dep, bias=bias)
  square = tokens * tokens * heads * head_dim
  core = [_product(f"{path}/scores", square, q_dep, k_dep),
          _product(f"{path}/values", square, q_dep or k_dep, v_dep)]
  o, o_dep = _linear(model, f"{path}/o", heads * head_dim, width, tokens,
                     q_dep or k_dep or v_dep, bias=bias)
  return q + k + v + core + o, o_dep


def _vit(model, config, tokens):
  """(products, output depends on a trained parameter) of the ViT."""
  ops, dep = _linear(model, "vit/embedding", config.patch_size**2 * 3,
                     config.width, tokens, False, bias=True)
  dep = dep or model.trained("vit/pos_embedding")
  for i in range(config.depth):
    path = f"vit/layers/{i}"
    x_dep = dep or model.trained(f"{path}/norm1/scale", f"{path}/norm1/bias")
    attn, attn_dep = _attention(
        model, f"{path}/attn", config.width, tokens, x_dep,
        heads=config.num_heads, kv_heads=config.num_heads,
        head_dim=config.width // config.num_heads, bias=True)
    dep = dep or attn_dep
    x_dep = dep or model.trained(f"{path}/norm2/scale", f"{path}/norm2/bias")
    fc1, fc1_dep = _linear(model, f"{path}/mlp/fc1", config.width,
                           config.mlp_dim, tokens, x_dep, bias=True)
    fc2, fc2_dep = _linear(model, f"{path}/mlp/fc2", config.mlp_dim,
                           config.width, tokens, fc1_dep, bias=True)
    ops += attn + fc1 + fc2
    dep = dep or fc2_dep
  return ops, dep or model.trained("vit/norm/scale", "vit/norm/bias")


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
    gate, gate_dep = _linear(model, f"{path}/mlp/gate", config.width,
                             config.mlp_dim, tokens, x_dep, bias=False)
    up, up_dep = _linear(model, f"{path}/mlp/up", config.width,
                         config.mlp_dim, tokens, x_dep, bias=False)
    down, down_dep = _linear(model, f"{path}/mlp/down", config.mlp_dim,
                             config.width, tokens, gate_dep or up_dep,
                             bias=False)
    ops += attn + gate + up + down
    dep = dep or down_dep
  dep = dep or model.trained("decoder/final_norm/scale")
  logits = _product("decoder/logits",
                    text_tokens * config.width * config.vocab_size, dep,
                    embedding)
  return ops + [logits]


def train_matmuls(config: VLMConfig, experts, trainable: str,
                  text_len: int) -> list[Matmul]:
  """Every matrix product of one training example, in forward order.

  Args:
    config: the backbone (e.g. `build.vlm_config(config.model)`).
    experts: `config.experts` entries.
    trainable: `config.train.trainable`, regex over parameter paths.
    text_len: L, text tokens per example (prefix + suffix, padding included:
      the model computes on padding too).
  """
  model = _Model(
      specs=[attach.ExpertSpec.parse(i, e) for i, e in enumerate(experts)],
      trainable=re.compile(trainable))
  image_tokens = config.vit.num_patches
  vit, vit_dep = _vit(model, config.vit, image_tokens)
  connector, image_dep = _linear(model, "connector/proj", config.vit.width,
                                 config.decoder.width, image_tokens, vit_dep,
                                 bias=True)
  return vit + connector + _decoder(model, config.decoder, image_tokens,
                                    text_len, image_dep)


@dataclasses.dataclass(frozen=True)
class TrainFlops:
  """FLOPs of one training example; `tokens` = image + text tokens."""
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
                text_len: int) -> TrainFlops:
  """Forward and backward FLOPs per example (see the module docstring)."""
  ops = train_matmuls(config, experts, trainable, text_len)
  return TrainFlops(forward=sum(op.forward for op in ops),
                    backward=sum(op.backward for op in ops),
                    tokens=config.vit.num_patches + text_len)
