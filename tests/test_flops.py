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
ADAPTERS_ONLY = r".*/adapters/.*"

SETTINGS = {
    "full": ([], r".*"),
    "lora": ([dict(kind="lora", targets=DECODER_LINEARS, rank=4)],
             ADAPTERS_ONLY),
    "smola": ([dict(kind="smola", targets=DECODER_LINEARS, rank=4,
                    pools=dict(text=4, image=4, all=4))], ADAPTERS_ONLY),
}
MAX_EXCESS = {"tiny": 0.12, "small": 0.07}
BATCH, TEXT_LEN = 8, 24


def _one_layer_per_tower(preset: str) -> dict:
  fields = build.model_config_to_dict(preset)
  fields["vit"]["depth"] = fields["decoder"]["depth"] = 1
  return fields


def xla_flops_per_example(preset: str, experts, trainable: str) -> float:
  """XLA's FLOPs of one jitted AdamW step on the trained parameters only.

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
      logits = nnx.merge(graphdef, params, frozen)(
          batch["image"], batch["text"], batch["mask_ar"],
          batch["mask_input"])
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits[:, :-1], batch["text"][:, 1:]))

    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state,
                                          params)
    return optax.apply_updates(params, updates), opt_state

  size = model.config.vit.image_size
  text = jnp.ones((BATCH, TEXT_LEN), jnp.int32)
  batch = dict(image=jnp.zeros((BATCH, size, size, 3)), text=text,
               mask_ar=text, mask_input=text)
  compiled = jax.jit(step).lower(params, optimizer.init(params), frozen,
                                 batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # Older jax: a list.
  return cost["flops"] / BATCH


@pytest.mark.parametrize("preset", sorted(MAX_EXCESS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_formula_matches_xla(preset, setting):
  experts, trainable = SETTINGS[setting]
  config = build.vlm_config(_one_layer_per_tower(preset))
  formula = flops.train_flops(config, experts, trainable, TEXT_LEN).total
  measured = xla_flops_per_example(preset, experts, trainable)
  assert formula <= measured <= formula * (1 + MAX_EXCESS[preset]), (
      f"{preset}/{setting}: XLA {measured:.4g}, formula {formula:.4g}")


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
