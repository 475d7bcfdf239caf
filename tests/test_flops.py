"""train/flops.py against the FLOPs XLA counts in a compiled training step.

XLA's `cost_analysis()['flops']` counts every matrix product of the step
(2 per multiply-add, after dead-code elimination) and also every elementwise
operation (norms, softmax, GELU, RoPE, the loss, AdamW), about one FLOP per
element, which the formula leaves out on purpose. So XLA's count must be at
least the formula's (a formula above XLA counts a gradient nobody computes,
e.g. backward through a frozen ViT) and above it by no more than the
elementwise share. That share shrinks as the widths grow: measured 3-5% at
the `small` preset's width 128, 10-11% at `tiny`'s width 32, where a softmax
element costs as much as a 16-wide dot product. Hence the bounds below:
7% for `small`, 12% for `tiny`.

Sparse MoE is compared at `small` only: at `tiny`'s width its routing
(softmax, top-k, one-hots, aux losses) alone is about the elementwise slack.
Its blocked dispatch runs tiles of one row (`tile=1`), so padding rows,
which the formula leaves out with the rest of dispatch, cost nothing; routed
LoRA experts use top_k = num_experts, so every expert the module computes
is one the formula counts.

XLA counts the body of a loop once, whatever its trip count, and each tower's
layers run as one scanned loop; so the comparison uses one layer per tower
(the formula's layers add up linearly, checked separately).
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from flax import nnx

from omnismola import build
from omnismola.train import flops
from omnismola.train import optim

DECODER_LINEARS = r"decoder/layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"
DECODER_QV = r"decoder/layers/\d+/attn/(q|v)"
MLP_BLOCKS = r"(vit|decoder)/layers/\d+/mlp"
ADAPTERS_ONLY = r".*/adapters/.*"

SETTINGS = {
    "full": ([], r".*"),
    "lora": ([dict(kind="lora", targets=DECODER_LINEARS, rank=4)],
             ADAPTERS_ONLY),
    "smola": ([dict(kind="smola", targets=DECODER_LINEARS, rank=4,
                    pools=dict(text=4, image=4, all=4))], ADAPTERS_ONLY),
    # Experts trained, the rest frozen (CuMo's second stage).
    "sparse_moe": ([dict(kind="sparse_moe", targets=MLP_BLOCKS,
                         num_experts=4, top_k=2, tile=1)],
                   r".*/mlp/(router|layers/.*)"),
    # VL-MoE's text-only MoE: image tokens through the dense MLP beside.
    "sparse_moe_dense_fallback": (
        [dict(kind="sparse_moe", targets=r"decoder/layers/\d+/mlp",
              pools=dict(text=4), top_k=2, tile=1, dense_fallback=True)],
        r".*"),
    "sparse_lora_instance": ([dict(kind="sparse_lora",
                                   targets=r"decoder/layers/\d+/mlp",
                                   num_experts=4, top_k=4, rank=4,
                                   global_expert=True)], ADAPTERS_ONLY),
    "sparse_lora_token": ([dict(kind="sparse_lora", targets=DECODER_QV,
                                routing="token", num_experts=4, top_k=4,
                                rank=4)], ADAPTERS_ONLY),
}
MAX_EXCESS = {"tiny": 0.12, "small": 0.07}
CASES = ([(preset, setting) for preset in sorted(MAX_EXCESS)
          for setting in ("full", "lora", "smola")] +
         [("small", "sparse_moe"), ("small", "sparse_moe_dense_fallback"),
          ("tiny", "sparse_lora_instance"),
          ("tiny", "sparse_lora_token")])
BATCH, TEXT_LEN = 8, 24


def _one_layer_per_tower(preset: str) -> dict:
  fields = build.model_config_to_dict(preset)
  fields["vit"]["depth"] = fields["decoder"]["depth"] = 1
  return fields


def xla_flops_per_example(preset: str, experts, trainable: str,
                          images: int = 1) -> float:
  """XLA's FLOPs of one jitted AdamW step on the trained parameters only,
  per row (packed rows of `images` examples when above 1).

  Frozen parameters are closed over, not differentiated, as in the trainer:
  they get neither gradients nor optimizer state.
  """
  config = ml_collections.ConfigDict(
      dict(model=_one_layer_per_tower(preset), experts=experts))
  model = build.build_model(config)
  graphdef, params, frozen = nnx.split(
      model, optim.trainable_filter(trainable), ...)
  optimizer = optax.adamw(1e-3)

  def step(params, opt_state, frozen, batch):
    def loss(params):
      logits, _ = nnx.merge(graphdef, params, frozen).forward(
          batch["image"], batch["text"], batch["mask_ar"],
          batch["mask_input"], batch.get("segment_ids"))
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits[:, :-1], batch["text"][:, 1:]))

    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state,
                                          params)
    return optax.apply_updates(params, updates), opt_state

  size = model.config.vit.image_size
  text = jnp.ones((BATCH, TEXT_LEN), jnp.int32)
  batch = dict(image=jnp.zeros((BATCH, size, size, 3)), text=text,
               mask_ar=text, mask_input=text)
  if images > 1:  # Every slot filled: segments of TEXT_LEN / images tokens.
    batch.update(image=jnp.zeros((BATCH, images, size, size, 3)),
                 segment_ids=jnp.broadcast_to(
                     1 + jnp.arange(TEXT_LEN) * images // TEXT_LEN,
                     text.shape))
  compiled = jax.jit(step).lower(params, optimizer.init(params), frozen,
                                 batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # Older jax: a list.
  return cost["flops"] / BATCH


@pytest.mark.parametrize("preset,setting", CASES)
def test_formula_matches_xla(preset, setting):
  experts, trainable = SETTINGS[setting]
  config = build.vlm_config(_one_layer_per_tower(preset))
  formula = flops.train_flops(config, experts, trainable, TEXT_LEN).total
  measured = xla_flops_per_example(preset, experts, trainable)
  assert formula <= measured <= formula * (1 + MAX_EXCESS[preset]), (
      f"{preset}/{setting}: XLA {measured:.4g}, formula {formula:.4g}")


@pytest.mark.parametrize("preset,setting", [("small", "smola"),
                                            ("tiny", "full")])
def test_formula_matches_xla_on_packed_rows(preset, setting):
  experts, trainable = SETTINGS[setting]
  config = build.vlm_config(_one_layer_per_tower(preset))
  formula = flops.train_flops(config, experts, trainable, TEXT_LEN,
                              images=3).total
  measured = xla_flops_per_example(preset, experts, trainable, images=3)
  assert formula <= measured <= formula * (1 + MAX_EXCESS[preset]), (
      f"{preset}/{setting} packed: XLA {measured:.4g}, formula "
      f"{formula:.4g}")
  # Three images' work on the same text: more than one image's.
  assert formula > flops.train_flops(config, experts, trainable,
                                     TEXT_LEN).total


def test_frozen_backbone_has_no_backward_through_the_vit():
  config = build.vlm_config(build.model_config_to_dict("small"))
  experts, trainable = SETTINGS["lora"]
  for op in flops.train_matmuls(config, experts, trainable, TEXT_LEN):
    if op.name.startswith(("vit/", "connector/")):
      assert op.grads == 0, op
    if op.name == "decoder/layers/0/attn/q":
      assert op.grads == 0, op  # Its input, the embeddings, is frozen.
    if op.name == "decoder/layers/0/attn/o":
      assert op.grads == 1, op  # Downstream of the q/k/v adapters.


def _ops(experts, trainable, text_len=TEXT_LEN, preset="small"):
  """{name: Matmul} of one training example."""
  config = build.vlm_config(build.model_config_to_dict(preset))
  return {op.name: op for op in flops.train_matmuls(config, experts,
                                                    trainable, text_len)}


def test_sparse_moe_costs_router_and_top_k_dense_mlps():
  config = build.vlm_config(build.model_config_to_dict("small"))
  tokens = config.num_image_tokens + TEXT_LEN
  moe = dict(kind="sparse_moe", targets=MLP_BLOCKS, num_experts=4, top_k=2)
  dense, routed = _ops([], r".*"), _ops([moe], r".*")
  for block, layer_names in (("vit/layers/0/mlp", ("fc1", "fc2")),
                             ("decoder/layers/0/mlp", ("gate", "up",
                                                       "down"))):
    for name in layer_names:
      op = f"{block}/{name}"
      assert routed[op].forward == 2 * dense[op].forward, op
    width = (config.vit if block.startswith("vit") else config.decoder).width
    block_tokens = (config.vit.num_patches if block.startswith("vit")
                    else tokens)
    assert routed[f"{block}/router"].forward == 2 * block_tokens * width * 4
  # The dense MLP beside one modality's pool runs on every token, once.
  fallback = _ops([dict(moe, pools=dict(text=4), num_experts=None,
                        dense_fallback=True)], r".*")
  for name in ("gate", "up", "down"):
    op = f"decoder/layers/0/mlp/{name}"
    assert fallback[op] == routed[op]
    assert fallback[f"decoder/layers/0/mlp/dense/{name}"].forward == (
        dense[op].forward)
  # The capacity factor changes nothing: dispatch is not counted.
  capacity = _ops([dict(moe, targets=r"vit/layers/\d+/mlp",
                        dispatch="capacity", capacity_factor=2.0)], r".*")
  assert capacity["vit/layers/0/mlp/fc1"] == routed["vit/layers/0/mlp/fc1"]


def test_sparse_moe_with_only_the_router_trained():
  moe = dict(kind="sparse_moe", targets=r"decoder/layers/\d+/mlp",
             num_experts=4, top_k=2)
  ops = _ops([moe], r".*/mlp/router")
  assert ops["decoder/layers/0/mlp/router"].grads == 1  # Its weight only.
  for name in ("gate", "up", "down"):  # Frozen, on frozen inputs.
    assert ops[f"decoder/layers/0/mlp/{name}"].grads == 0
  assert ops["decoder/logits"].grads == 1  # Downstream of the gates.


def test_sparse_lora_counts_active_experts_and_routes_once_per_example():
  entry = dict(kind="sparse_lora", targets=r"decoder/layers/\d+/mlp",
               num_experts=4, rank=8, global_expert=True)
  config = build.vlm_config(build.model_config_to_dict("small"))
  width, path = config.decoder.width, "decoder/layers/0/mlp/adapters/"
  top1, top2 = _ops([entry], ADAPTERS_ONLY), _ops([dict(entry, top_k=2)],
                                                  ADAPTERS_ONLY)
  for matrix in ("a", "b"):
    op = f"{path}sparse_lora_0/experts/{matrix}"
    assert top2[op].forward == 2 * top1[op].forward
    # One active expert costs what the always-on global expert costs.
    assert top1[op].forward == top1[
        f"{path}sparse_lora_0/global_expert/{matrix}"].forward
  # Instance routing: one router product per example, whatever its length;
  # its input (the prompt embedding) is frozen, so only the weight gradient.
  for text_len in (TEXT_LEN, 2 * TEXT_LEN):
    router = _ops([entry], ADAPTERS_ONLY, text_len)[
        f"{path}sparse_lora_0/router"]
    assert router.forward == 2 * width * 4 and router.grads == 1
  token = _ops([dict(entry, routing="token")], ADAPTERS_ONLY)
  tokens = config.num_image_tokens + TEXT_LEN
  assert token[f"{path}sparse_lora_0/router"].forward == (
      2 * tokens * width * 4)


def test_full_training_costs_about_three_forwards():
  config = build.vlm_config(build.model_config_to_dict("small"))
  count = flops.train_flops(config, [], r".*", TEXT_LEN)
  # Only the patch embedding has no input gradient (its input is pixels).
  assert 2.9 < count.total / count.forward <= 3.0
  assert count.per_token == count.total / (64 + TEXT_LEN)


def test_layers_add_up_linearly():
  fields = build.model_config_to_dict("small")
  count = lambda depth: flops.train_flops(
      build.vlm_config(dict(fields, decoder=dict(fields["decoder"],
                                                 depth=depth))),
      [], r".*", TEXT_LEN).total
  assert count(3) - count(2) == pytest.approx(count(2) - count(1))
  assert count(2) > count(1)


def test_mfu_and_peaks():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(989e12, 2.0, 1, 989e12) == pytest.approx(0.5)
