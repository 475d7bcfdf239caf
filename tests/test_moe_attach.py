"""Sparse MoE blocks attached by config: paths, routing reports, causality,
cached decoding and upcycling from a dense parent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnismola import build
from omnismola.experts import stats
from omnismola.experts import upcycle
from omnismola.experts.sparse import MoEAux, SparseMoE
from omnismola.models import layers, presets
from omnismola.models.vlm import VLM

# Vision and decoder widths differ, so the connector maps 48 -> 32.
TINY = dict(decoder_depth=2, vit_depth=2, vit_width=48, connector="mlp")
EVERY_MLP = r"(vit|decoder)/layers/\d+/mlp|connector/mlp"
GEMMA2 = dict(decoder_post_norms=True, decoder_attn_logit_softcap=5.0,
              decoder_final_logit_softcap=3.0,
              decoder_query_pre_attn_scalar=24.0, decoder_sliding_window=3)


def _moe(targets, **options):
  return dict(dict(kind="sparse_moe", targets=targets, num_experts=4,
                   top_k=2), **options)


def _model(experts=(), seed=0, **overrides) -> VLM:
  config = presets.get_preset("tiny", **dict(TINY, **overrides))
  return VLM(config, plan=build.expert_plan(experts, config),
             rngs=nnx.Rngs(seed))


def _batch(model, batch=2, length=6, seed=0):
  """Two prefix tokens, then suffix; example 1 ends in one padding token."""
  size = model.config.vit.image_size
  image = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3),
                             minval=-1, maxval=1)
  text = jax.random.randint(jax.random.key(seed + 1), (batch, length), 3,
                            259, dtype=jnp.int32)
  mask_ar = jnp.asarray(np.arange(length) >= 2, jnp.int32)[None].repeat(
      batch, 0)
  mask_input = jnp.ones((batch, length), jnp.int32).at[1, -1].set(0)
  return image, text, mask_ar, mask_input


@nnx.jit
def _forward(model, *batch):
  return model.forward(*batch)


def test_sparse_moe_replaces_matched_mlp_blocks_in_towers_and_connector():
  model = _model([_moe(r"vit/layers/\d+/mlp"), _moe("connector/mlp"),
                  _moe(r"decoder/layers/\d+/mlp", num_experts=3)])
  config = model.config
  expected = {  # block -> (activation, {layer: kernel shape}).
      "vit/layers/mlp": ("gelu", {"fc1": (2, 4, 48, 64),
                                  "fc2": (2, 4, 64, 48)}),
      "connector/mlp": ("gelu", {"fc1": (4, 48, 32), "fc2": (4, 32, 32)}),
      "decoder/layers/mlp": ("geglu", {"gate": (2, 3, 32, 64),
                                       "up": (2, 3, 32, 64),
                                       "down": (2, 3, 64, 32)}),
  }
  blocks = {"vit/layers/mlp": model.vit.layers.mlp,
            "connector/mlp": model.connector.mlp,
            "decoder/layers/mlp": model.decoder.layers.mlp}
  for path, (activation, kernels) in expected.items():
    block = blocks[path]
    assert isinstance(block, SparseMoE)
    assert block.activation == activation
    assert {name: layer.kernel.shape for name, layer in block.layers.items()
            } == kernels
    axes = block.layers[next(iter(kernels))].kernel.get_metadata()[
        "logical_axes"]
    assert axes == (("layers",) if "/layers/" in path else ()) + (
        "expert", "embed", "mlp")
  assert config.connector == "mlp"
  # A dense model keeps its plain blocks.
  assert isinstance(_model().decoder.layers.mlp, layers.GeGLU)


def test_adapters_go_with_dense_blocks_only():
  lora = dict(kind="lora", targets="connector/mlp/fc1", rank=2)
  with pytest.raises(ValueError, match=r"experts\[1\] add adapters inside "
                     r"the MLP block connector/mlp, which config.experts\[0\]"):
    _model([_moe("connector/mlp"), lora])
  beside = dict(kind="sparse_lora", targets="connector/mlp", num_experts=2,
                rank=2, routing="token")
  with pytest.raises(ValueError, match=r"experts\[1\] add adapters beside"):
    _model([_moe("connector/mlp"), beside])


def test_unmatched_mlp_target_lists_the_mlp_blocks():
  with pytest.raises(ValueError, match="(?s)matched no MLP block.*"
                     "connector/mlp.*decoder/layers/1/mlp.*vit/layers/0/mlp"):
    _model([_moe(r"decoder/layers/\d+/ffn")])


def test_a_block_is_replaced_once():
  with pytest.raises(ValueError, match="replaced once"):
    _model([_moe("connector/mlp"), _moe("connector/.*")])


def test_bad_sparse_moe_option_names_the_block():
  with pytest.raises(ValueError, match="experts\\[0\\].*connector/mlp.*topk"):
    _model([_moe("connector/mlp", topk=1)])


def test_capacity_dispatch_is_refused_in_the_decoder_only():
  with pytest.raises(ValueError, match="decoder/layers/mlp.*not causal"):
    _model([_moe(r"decoder/layers/\d+/mlp", dispatch="capacity")])
  model = _model([_moe(r"vit/layers/\d+/mlp|connector/mlp",
                       dispatch="capacity")])
  assert model.vit.layers.mlp.dispatch == "capacity"


def test_forward_returns_routing_reports_per_block_stacked_over_layers():
  model = _model([_moe(EVERY_MLP)])
  batch = _batch(model)
  logits, reports = _forward(model, *batch)
  assert all(set(report) == {"routing"} for report in reports.values())
  aux = stats.routing_reports(reports)
  np.testing.assert_allclose(logits, model(*batch), rtol=0, atol=1e-5)
  shapes = {path: jax.tree.map(jnp.shape, a) for path, a in aux.items()}
  expected = lambda lead: MoEAux(  # lead: the layer axis of a stack, or ().
      balance_loss=lead, z_loss=lead, tokens_per_expert=lead + (4,),
      max_violation=lead, router_entropy=lead, dropped_fraction=lead)
  assert shapes == {"vit/layers/mlp": expected((2,)),
                    "connector/mlp": expected(()),
                    "decoder/layers/mlp": expected((2,))}
  # Every routed token sends top_k = 2 copies; padding sends none.
  image_tokens = 2 * model.num_image_tokens
  np.testing.assert_array_equal(
      aux["vit/layers/mlp"].tokens_per_expert.sum(-1), 2 * image_tokens)
  np.testing.assert_array_equal(
      aux["decoder/layers/mlp"].tokens_per_expert.sum(-1),
      2 * (image_tokens + int(batch[3].sum())))
  np.testing.assert_array_equal(aux["decoder/layers/mlp"].dropped_fraction, 0)
  assert _forward(_model(), *batch)[1] == {}


@pytest.mark.parametrize("options", [dict(num_experts=4),
                                     dict(num_experts=None,
                                          pools=dict(image=2, text=3))],
                         ids=["shared", "modality_pools"])
def test_decoder_sparse_moe_suffix_tokens_are_causal(options):
  model = _model([_moe(r"decoder/layers/\d+/mlp", **options)])
  image, text, mask_ar, mask_input = _batch(model)
  before, _ = _forward(model, image, text, mask_ar, mask_input)
  for t in (3, 5):
    after, _ = _forward(model, image, text.at[:, t].set(7), mask_ar,
                        mask_input)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0,
                               atol=1e-6)
    assert np.abs(after[0, t:] - before[0, t:]).max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, GEMMA2], ids=["gemma", "gemma2"])
def test_decoder_sparse_moe_prefill_and_extend_match_the_full_forward(
    overrides):
  """As tests/test_models.py, prompts of two lengths, with MoE decoder MLPs."""
  model = _model([_moe(EVERY_MLP)], **overrides)
  prompt_lens, prompt_len, steps = [4, 2], 4, 3
  image, text, _, _ = _batch(model, length=prompt_len + steps)
  rows = np.arange(2)
  full_text = np.zeros((2, prompt_len + steps), np.int32)
  full_ar = np.zeros_like(full_text)
  full_input = np.zeros_like(full_text)
  for b, p in enumerate(prompt_lens):  # [prompt, suffix, padding].
    full_text[b, :p + steps] = text[b, :p + steps]
    full_ar[b, p:p + steps] = 1
    full_input[b, :p + steps] = 1
  full, _ = _forward(model, image, *map(jnp.asarray,
                                        (full_text, full_ar, full_input)))

  prompt_input = (np.arange(prompt_len) < np.array(prompt_lens)[:, None])
  n = model.num_image_tokens
  last, cache = nnx.jit(lambda m, *a: m.prefill(
      *a, cache_length=n + prompt_len + steps))(
          model, image, jnp.asarray(full_text[:, :prompt_len] * prompt_input),
          jnp.zeros((2, prompt_len), jnp.int32),
          jnp.asarray(prompt_input, jnp.int32))
  at = np.array(prompt_lens) - 1
  np.testing.assert_allclose(last, full[rows, at], atol=1e-5)
  extend = nnx.jit(lambda m, t, c: m.extend(t, c))
  for t in range(steps):
    suffix = jnp.asarray(full_text[rows, at + t + 1])
    logits, cache = extend(model, suffix, cache)
    np.testing.assert_allclose(logits, full[rows, at + t + 1], atol=1e-5)


def _upcycled(dense: VLM, moe: VLM, **noise) -> VLM:
  """`moe` with the dense model's parameters, its MoE blocks upcycled."""
  graphdef, state = nnx.split(moe)

  def fill(dense_params, moe_params):
    if isinstance(moe_params, dict) and "router" in moe_params:
      return upcycle.upcycle_mlp(dense_params, moe_params, **noise)
    if isinstance(moe_params, dict):
      return {k: fill(dense_params[k], v) for k, v in moe_params.items()}
    return dense_params

  nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(nnx.state(dense)),
                                       nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("overrides", [{}, GEMMA2], ids=["gemma", "gemma2"])
def test_upcycled_moe_vlm_computes_its_dense_parent(overrides):
  dense = _model(seed=0, **overrides)
  moe = _model([_moe(EVERY_MLP)], seed=1, **overrides)
  batch = _batch(dense)
  want = _forward(dense, *batch)[0]
  got, reports = _forward(_upcycled(dense, moe), *batch)
  # Padding is never routed (the MoE gives it 0, the dense MLP does not);
  # no real token attends to it.
  valid = np.asarray(batch[3], bool)
  np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-5)
  assert len(reports) == 3  # The routers did run.
  noisy = _forward(_upcycled(dense, moe, noise_std=0.1,
                             key=jax.random.key(0)), *batch)[0]
  assert np.abs(noisy - want).max() > 1e-3


def test_expert_copies_keep_stack_axes_and_add_independent_noise():
  dense = {"fc1": {"kernel": jnp.arange(30.).reshape(2, 3, 5),
                   "bias": jnp.ones((2, 5))}}
  copies = upcycle.expert_copies(dense, 4)
  assert copies["fc1"]["kernel"].shape == (2, 4, 3, 5)
  assert copies["fc1"]["bias"].shape == (2, 4, 5)
  for e in range(4):
    np.testing.assert_array_equal(copies["fc1"]["kernel"][:, e],
                                  dense["fc1"]["kernel"])
  lora = {"a": jnp.zeros((6, 2)), "b": jnp.zeros((2, 7))}  # One LoRA ...
  experts = upcycle.expert_copies(lora, 3, noise_std=0.5,
                                  key=jax.random.key(0))  # ... into three.
  assert experts["a"].shape == (3, 6, 2) and experts["b"].shape == (3, 2, 7)
  assert not np.allclose(experts["a"][0], experts["a"][1])
  assert 0.3 < float(jnp.std(experts["b"])) < 0.7
  with pytest.raises(ValueError, match="needs a PRNG key"):
    upcycle.expert_copies(lora, 3, noise_std=0.5)


def test_upcycle_mlp_checks_the_dense_block_fits():
  moe = nnx.to_pure_dict(nnx.state(SparseMoE(
      4, 8, num_experts=2, activation="geglu", rngs=nnx.Rngs(0))))
  gelu_block = {"fc1": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
                "fc2": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}
  with pytest.raises(ValueError, match="do not fit"):
    upcycle.upcycle_mlp(gelu_block, moe)
