"""flops.py: FLOPs counted in the traced program, against XLA's own count.

XLA's `cost_analysis()['flops']` counts every matrix product of a compiled
step (2 per multiply-add, after dead-code elimination) and also every
elementwise operation (norms, softmax, GELU, RoPE, the loss, AdamW), about
one FLOP per element, which flops.py leaves out on purpose. So XLA's count
must be at least the program's products and above them by no more than the
elementwise share. That share shrinks as the widths grow: measured 3-5% at
the `small` preset's width 128, 10-11% at `tiny`'s width 32, where a softmax
element costs as much as a 16-wide dot product. Hence the bounds below: 7%
for `small`, 12% for `tiny`.

XLA counts the body of a loop once, whatever its trip count; so the
comparison runs one unrolled layer per tower (`scan_layers=False`), and the
scan's multiplication is checked separately.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from flax import nnx

from omnismola import build
from omnismola import config_lib
from omnismola import flops
from omnismola.train import optim
from omnismola.train import trainer

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
    # Capacity dispatch is not causal: the ViT's blocks only.
    "sparse_moe_capacity": ([dict(kind="sparse_moe",
                                  targets=r"vit/layers/\d+/mlp",
                                  num_experts=4, top_k=2,
                                  dispatch="capacity")], r".*"),
    # VL-MoE's text-only MoE: image tokens through the dense MLP beside.
    "sparse_moe_dense_fallback": (
        [dict(kind="sparse_moe", targets=r"decoder/layers/\d+/mlp",
              pools=dict(text=4), top_k=2, tile=1, dense_fallback=True)],
        r".*"),
    "sparse_lora_instance": ([dict(kind="sparse_lora",
                                   targets=r"decoder/layers/\d+/mlp",
                                   num_experts=4, top_k=1, rank=4,
                                   global_expert=True)], ADAPTERS_ONLY),
    "sparse_lora_token": ([dict(kind="sparse_lora", targets=DECODER_QV,
                                routing="token", num_experts=4, top_k=2,
                                rank=4)], ADAPTERS_ONLY),
}
MAX_EXCESS = {"tiny": 0.12, "small": 0.07}
CASES = ([(preset, setting) for preset in sorted(MAX_EXCESS)
          for setting in ("full", "lora", "smola")] +
         [("small", "sparse_moe"), ("small", "sparse_moe_capacity"),
          ("small", "sparse_moe_dense_fallback"),
          ("tiny", "sparse_lora_instance"), ("tiny", "sparse_lora_token")])
BATCH, TEXT_LEN = 8, 24


def _one_layer_per_tower(preset: str) -> dict:
  fields = build.model_config_to_dict(preset)
  fields["vit"]["depth"] = fields["decoder"]["depth"] = 1
  fields["scan_layers"] = False
  return fields


def adamw_step(model_fields: dict, experts, trainable: str, images: int = 1):
  """(step, its arguments): one AdamW step on the trained parameters only,
  frozen ones closed over as in the trainer, on BATCH rows (packed rows of
  `images` examples when above 1)."""
  config = ml_collections.ConfigDict(dict(model=model_fields,
                                          experts=experts))
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
  return step, (params, optimizer.init(params), frozen, batch)


def xla_flops(step, args) -> float:
  cost = jax.jit(step).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # Older jax: a list.
  return cost["flops"]


@pytest.mark.parametrize("preset,setting", CASES)
def test_count_matches_xla(preset, setting):
  experts, trainable = SETTINGS[setting]
  step, args = adamw_step(_one_layer_per_tower(preset), experts, trainable)
  count, measured = flops.count(step, *args), xla_flops(step, args)
  assert count.computed <= measured <= count.computed * (
      1 + MAX_EXCESS[preset]), (f"{preset}/{setting}: XLA {measured:.4g}, "
                                f"counted {count.computed:.4g}")
  if setting in ("full", "lora", "smola"):  # Nothing computed in vain.
    assert count.required == count.computed
  else:
    assert 0 < count.required < count.computed


def test_count_matches_xla_on_packed_rows():
  experts, trainable = SETTINGS["smola"]
  step, args = adamw_step(_one_layer_per_tower("small"), experts, trainable,
                          images=3)
  count, measured = flops.count(step, *args), xla_flops(step, args)
  assert count.computed <= measured <= count.computed * 1.07
  step, args = adamw_step(_one_layer_per_tower("small"), experts, trainable)
  # Three images' work on the same text: more than one image's.
  assert count.computed > flops.count(step, *args).computed


def _config(preset="small", experts=(), trainable=r".*", **model):
  config = config_lib.load_config_file(f"configs/mix.py:preset={preset}")
  config.experts = list(experts)
  config.train.trainable = trainable
  config.train.batch_size = BATCH
  config.model.update(model)
  return config


def test_scanned_layers_count_their_trip_count():
  experts, trainable = SETTINGS["lora"]

  def train_flops(depth, scan_layers=True):
    config = _config(experts=experts, trainable=trainable,
                     scan_layers=scan_layers)
    config.model.decoder.depth = depth
    return trainer.step_flops(config)[0].computed

  assert train_flops(3) - train_flops(2) == pytest.approx(
      train_flops(2) - train_flops(1))
  assert train_flops(2) > train_flops(1)
  # Unrolled, the first layer's gradient towards the (frozen) embeddings is
  # dead code; a scan computes it in every trip: a little more.
  unrolled = train_flops(3, scan_layers=False)
  assert unrolled < train_flops(3) < 1.02 * unrolled


def test_remat_recomputation_is_computed_not_required():
  plain, _ = trainer.step_flops(_config())
  remat, _ = trainer.step_flops(_config(remat_policy="full"))
  assert remat.required == pytest.approx(plain.required)
  # The forward pass again in the backward: about a third more.
  assert 1.2 < remat.computed / plain.computed < 1.4


def test_full_training_costs_about_three_forwards_and_adapters_about_two():
  train, forward = trainer.step_flops(_config())
  # Only the patch embedding has no input gradient (its input is pixels).
  assert 2.9 < train.required / forward.required <= 3.0
  # Frozen backbone, LoRA in the decoder: no backward through the ViT or
  # the connector, and no weight gradients for the decoder's base weights.
  experts, trainable = SETTINGS["lora"]
  train, forward = trainer.step_flops(_config(experts=experts,
                                              trainable=trainable))
  assert 1.7 < train.required / forward.required < 2.0


def test_sparse_lora_requires_its_chosen_experts_only():
  entry = dict(kind="sparse_lora", targets=r"decoder/layers/\d+/mlp",
               num_experts=4, rank=8)
  counts = {k: trainer.step_flops(_config(experts=[dict(entry, top_k=k)],
                                          trainable=ADAPTERS_ONLY))[0]
            for k in (1, 2, 4)}
  # Every expert is computed whatever top_k (the top-k gates' own products,
  # per token, aside: 0.005% here) ...
  assert counts[1].computed == pytest.approx(counts[4].computed, rel=1e-4)
  assert counts[4].required == counts[4].computed
  # ... and each chosen one adds the same to what is required.
  assert counts[2].required - counts[1].required == pytest.approx(
      (counts[4].required - counts[2].required) / 2)
  assert counts[1].required < counts[2].required


def test_capacity_buffers_are_computed_not_required():
  entry = dict(kind="sparse_moe", targets=r"vit/layers/\d+/mlp",
               num_experts=4, top_k=2, dispatch="capacity")
  count = lambda factor: trainer.step_flops(_config(experts=[dict(
      entry, capacity_factor=factor)]))[0]
  tight, roomy = count(1.0), count(2.0)
  assert roomy.computed > tight.computed
  # Empty slots and the one-hot moves are not model FLOPs: the same
  # requirement whatever the room.
  assert roomy.required == pytest.approx(tight.required)


def test_required_share_scales_and_nests():
  x = jnp.ones((4, 8))
  w = jnp.ones((8, 16))

  def fn(x, w):
    y = x @ w  # 2 * 4 * 8 * 16 = 1024 FLOPs.
    with flops.required_share(0.5):
      y = y + x @ w
      with flops.required_share(0.5):
        y = y + x @ w
    return y

  assert flops.count(fn, x, w) == flops.Count(3 * 1024, 1024 * 1.75)
  # Gradients keep their forward product's share. (fn is linear in w: its
  # gradient needs one product per forward product, and no forward.)
  grad = jax.grad(lambda w: jnp.sum(fn(x, w)))
  assert flops.count(grad, w) == flops.Count(3 * 1024, 1024 * 1.75)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    with flops.required_share(1.5):
      pass


def test_loops_and_branches():
  w = jnp.ones((8, 8))
  scanned = lambda w: jax.lax.scan(lambda h, _: (h @ w, None),
                                   jnp.ones((2, 8)), None, length=5)[0]
  assert flops.count(scanned, w).computed == 5 * 2 * 2 * 8 * 8
  branch = lambda p, w: jax.lax.cond(p, lambda: w @ w, lambda: w)
  assert flops.count(branch, True, w).computed == 2 * 8 * 8 * 8


def test_mfu_and_peaks():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(989e12, 2.0, 1, 989e12) == pytest.approx(0.5)
