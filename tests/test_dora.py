"""DoRA adapters: the paper's formula, its detached norm, an exact start from
any loaded kernel, attachment by config, training and FLOPs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from omnismola import build
from omnismola import flops
from omnismola.models import layers, presets
from omnismola.models.layers import TokenInfo
from omnismola.models.vlm import VLM

import checks

B, T, D_IN, D_OUT, RANK = 2, 5, 12, 10, 3
DECODER_LINEARS = r"decoder/layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"


def _tokens():
  shape = (B, T)
  return TokenInfo(is_image=jnp.zeros(shape, bool),
                   valid=jnp.ones(shape, bool),
                   bidirectional=jnp.zeros(shape, bool))


def _layer(kind="dora", **options):
  return checks.with_experts(
      [dict(kind=kind, targets="blk/q", rank=RANK, **options)],
      checks.linear(D_IN, D_OUT, axes=("embed", "heads"), use_bias=True))


def _reference(params, x, *, detach_norm=True):
  """y = x m (W + s A B) / ||W + s A B||_c + bias, m = g ||W||_c: the
  paper's weight, formed whole."""
  kernel, dora = params["kernel"], params["adapters"]["dora_0"]
  merged = kernel + 2.0 * dora["a"] @ dora["b"]   # s = alpha / rank = 2.
  norm = jnp.linalg.norm(merged, axis=0)
  if detach_norm:
    norm = jax.lax.stop_gradient(norm)
  magnitude = dora["magnitude"] * jnp.linalg.norm(kernel, axis=0)
  return x @ (merged * magnitude / norm) + params["bias"]


def test_dora_layer_computes_the_papers_weight_with_the_norm_detached():
  layer = checks.randomized(_layer(alpha=2.0 * RANK))
  x = checks.assert_matches_reference(layer, _reference, _tokens(),
                                      in_features=D_IN, out_features=D_OUT)
  # The detached norm changes the gradients (so the check above sees it).
  params = nnx.to_pure_dict(nnx.state(layer))
  loss = lambda params, detach: jnp.sum(
      _reference(params, x, detach_norm=detach) ** 2)
  detached = jax.grad(loss)(params, True)["adapters"]["dora_0"]["b"]
  through = jax.grad(loss)(params, False)["adapters"]["dora_0"]["b"]
  assert not np.allclose(detached, through, rtol=1e-3, atol=1e-4)


def test_dora_starts_as_the_base_layer_whatever_kernel_is_loaded():
  layer = _layer()
  # As a pretrained checkpoint does: the kernel and bias change after the
  # adapter was built; the adapter's own parameters stay fresh.
  layer = checks.randomized(layer, scale=3.0,
                            where=lambda path: "adapters" not in path)
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  base = x @ layer.kernel[...] + layer.bias[...]
  np.testing.assert_array_equal(layer(x, _tokens()), base)


def test_dora_parameters_live_beside_the_layer_and_scale_its_columns():
  layer = _layer()
  dora = layer.adapters["dora_0"]
  assert dora.a.shape == (D_IN, RANK) and dora.b.shape == (RANK, D_OUT)
  assert dora.magnitude.shape == (D_OUT,)
  assert dora.magnitude.logical_axes == ("heads",)
  # With B = 0, g scales each output column of x W.
  dora.magnitude.set_value(jnp.arange(1.0, D_OUT + 1.0))
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  np.testing.assert_allclose(
      layer(x, _tokens()),
      (x @ layer.kernel[...]) * jnp.arange(1.0, D_OUT + 1.0) +
      layer.bias[...], rtol=1e-5, atol=1e-5)


def test_dora_attaches_to_linear_layers_only():
  with pytest.raises(ValueError, match="dora.*matched no linear layer"):
    checks.with_experts([dict(kind="dora", targets="blk/mlp", rank=2)],
                        lambda rngs: layers.Mlp(D_IN, 16, rngs=rngs),
                        path="blk/mlp")


def test_dora_costs_one_rank_r_product_of_the_kernel_more_than_lora():
  x = jax.ShapeDtypeStruct((B, T, D_IN), jnp.float32)
  forward = lambda layer: flops.count(
      lambda x: layer(x, _tokens()), x).computed
  assert forward(_layer()) - forward(_layer("lora")) == 2 * D_IN * RANK * D_OUT


def _tiny_vlm(experts):
  config = presets.get_preset("tiny", decoder_depth=2, vit_depth=1)
  return VLM(config, plan=build.expert_plan(experts, config),
             rngs=nnx.Rngs(0))


def _batch(model):
  size = model.config.vit.image_size
  length = 8
  return dict(
      image=jax.random.uniform(jax.random.key(1), (4, size, size, 3),
                               minval=-1, maxval=1),
      text=jax.random.randint(jax.random.key(2), (4, length), 3, 100),
      mask_ar=jnp.asarray(np.arange(length) >= 3, jnp.int32)[None].repeat(
          4, 0),
      mask_input=jnp.ones((4, length), jnp.int32))


def test_dora_on_every_decoder_linear_trains_a_frozen_backbone():
  model = _tiny_vlm([dict(kind="dora", targets=DECODER_LINEARS, rank=2)])
  batch = _batch(model)
  is_adapter = nnx.PathContains("adapters")
  graphdef, params, frozen = nnx.split(model, is_adapter, ...)
  magnitudes = {"/".join(map(str, path)): variable.shape
                for path, variable in nnx.to_flat_state(params)
                if path[-1] == "magnitude"}
  # One per linear layer of the (stacked) decoder layer, for both layers.
  assert len(magnitudes) == 7, magnitudes
  assert magnitudes["decoder/layers/attn/q/adapters/dora_0/magnitude"][0] == 2
  loss = lambda params: checks.next_token_loss(
      nnx.merge(graphdef, params, frozen), batch)
  optimizer = optax.adam(3e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  losses = []
  for _ in range(20):
    params, opt_state, value = step(params, opt_state)
    losses.append(float(value))
  assert losses[-1] < 0.8 * losses[0], losses
