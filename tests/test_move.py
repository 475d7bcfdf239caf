"""MoME's mixture of vision encoders: the `move` connector and the VLM with
several encoders (pooling, router, loop reference, training, decoding,
config round trip, FLOPs)."""
import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import checks
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from omnismola import build
from omnismola import config_lib
from omnismola import flops
from omnismola import schema
from omnismola.models import layers, presets, stack
from omnismola.models.connectors import (MoVEConfig, adaptive_avg_pool,
                                         make_connector)
from omnismola.models.layers import TokenInfo
from omnismola.models.vit import ViTConfig
from omnismola.models.vlm import VLM
from omnismola.train import init as init_lib
from omnismola.train import trainer

# A second encoder unlike the tiny preset's (16 px / 8, width 32, 2 heads):
# other input size (the image is resized), patch size, width and head count.
SECOND_ENCODER = ViTConfig(image_size=12, patch_size=4, width=24, depth=1,
                           num_heads=3, mlp_dim=48)
# For the connector alone: patch grids 4 x 4 and 5 x 5, both pooled to 3 x 3.
ENCODERS = {"vit": ViTConfig(image_size=16, patch_size=4, width=16, depth=1,
                             num_heads=2, mlp_dim=32),
            "vit_1": ViTConfig(image_size=15, patch_size=3, width=12, depth=1,
                               num_heads=3, mlp_dim=24)}
DECODER_WIDTH = 8


def _two_encoder_config(**move) -> presets.VLMConfig:
  return presets.get_preset("tiny", connector="move",
                            extra_vits=(SECOND_ENCODER,),
                            move=MoVEConfig(**move))


def _batch(config, batch=3, prompt=4, suffix=4, seed=0):
  """Random images and text; each example's prompt differs."""
  keys = jax.random.split(jax.random.key(seed), 2)
  size = config.vit.image_size
  image = jax.random.uniform(keys[0], (batch, size, size, 3), minval=-1,
                             maxval=1)
  text = jax.random.randint(keys[1], (batch, prompt + suffix), 3, 259,
                            dtype=jnp.int32)
  mask_ar = jnp.broadcast_to(
      jnp.arange(prompt + suffix) >= prompt, text.shape).astype(jnp.int32)
  return dict(image=image, text=text, mask_ar=mask_ar,
              mask_input=jnp.ones_like(text))


# --- Loop references ---------------------------------------------------------


def _pool_loop(x, grid, side):
  """Adaptive average pooling bin by bin: output (i, j) is the mean of rows
  [floor(i g / s), ceil((i + 1) g / s)) and the same columns."""
  x = x.reshape(x.shape[0], grid, grid, x.shape[-1])
  bounds = [(math.floor(i * grid / side), math.ceil((i + 1) * grid / side))
            for i in range(side)]
  return jnp.stack([x[:, r0:r1, c0:c1].mean(axis=(1, 2))
                    for r0, r1 in bounds for c0, c1 in bounds], axis=1)


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _attention_loop(queries, keys, p, heads):
  """Multi-head attention with biases, one head at a time."""
  q, k, v = (_dense(queries, p["q"]), _dense(keys, p["k"]),
             _dense(keys, p["v"]))
  d = q.shape[-1] // heads
  outs = []
  for h in range(heads):
    part = slice(h * d, (h + 1) * d)
    scores = jnp.einsum("bld,bnd->bln", q[..., part], k[..., part]) / d**0.5
    outs.append(jax.nn.softmax(scores, axis=-1) @ v[..., part])
  return _dense(jnp.concatenate(outs, axis=-1), p["o"])


def _branch_loop(p, features, encoder, side):
  """One encoder's branch from its parameters, layer by layer."""
  y = _pool_loop(features, encoder.image_size // encoder.patch_size, side)
  depth = p["layers"]["norm1"]["scale"].shape[0]
  for i in range(depth):
    layer = jax.tree.map(lambda a, i=i: a[i], p["layers"])
    normed = _layer_norm(y, layer["norm1"])
    y = y + _attention_loop(normed, normed, layer["self_attn"],
                            encoder.num_heads)
    y = y + _attention_loop(_layer_norm(y, layer["norm2"]), features,
                            layer["cross_attn"], encoder.num_heads)
    hidden = jax.nn.gelu(_dense(_layer_norm(y, layer["norm3"]),
                                layer["mlp"]["fc1"]))
    y = y + _dense(hidden, layer["mlp"]["fc2"])
  return _dense(_layer_norm(y, p["norm"]), p["proj"])


def _router_loop(p, instance):
  """G(I) = softmax(W2 gelu(W1 I + b1) + b2)."""
  return jax.nn.softmax(_dense(jax.nn.gelu(_dense(instance, p["hidden"])),
                               p["out"]), axis=-1)


def _connector_and_inputs(num_tokens=9, adt_depth=2, seed=0, mixer="router"):
  connector = make_connector(
      "move", ENCODERS, DECODER_WIDTH,
      move=MoVEConfig(num_tokens=num_tokens, adt_depth=adt_depth,
                      mixer=mixer),
      plan=stack.Plan("connector"), rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(connector)
  keys = jax.random.split(jax.random.key(seed + 1), 3)
  features = tuple(
      jax.random.normal(key, (2, encoder.num_patches, encoder.width))
      for key, encoder in zip(keys, ENCODERS.values()))
  instance = jax.random.normal(keys[2], (2, DECODER_WIDTH))
  tokens = TokenInfo.image(2, num_tokens, instance)
  run = lambda params, features: nnx.merge(graphdef, params)(features,
                                                             tokens)[0]
  return run, nnx.to_pure_dict(state), features, instance




# --- The connector -----------------------------------------------------------


@pytest.mark.parametrize("grid,side", [(5, 3), (7, 2), (3, 5), (4, 4)])
def test_adaptive_pooling_equals_a_numpy_loop(grid, side):
  x = np.random.default_rng(0).normal(size=(2, grid * grid, 3))
  np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), grid, side),
                             _pool_loop(x, grid, side), rtol=1e-5, atol=1e-6)


def test_connector_equals_the_weighted_loop_of_its_branches():
  """F = sum_i G(I)_i f_i, every piece from the parameters, values and
  gradients (of the parameters and of both encoders' features)."""
  run, params, features, instance = _connector_and_inputs()

  def reference(params, features):
    weights = _router_loop(params["router"], instance)
    return sum(weights[:, i, None, None] *
               _branch_loop(params[name], x, encoder, side=3)
               for i, ((name, encoder), x) in enumerate(
                   zip(ENCODERS.items(), features)))

  # A random projection of the outputs [2, 9, 8] makes them one scalar
  # whose gradients the helper compares.
  w = jax.random.normal(jax.random.key(7), (2, 9, DECODER_WIDTH))
  scalar = lambda f: jax.jit(lambda params, x: jnp.sum(f(params, x) * w))
  checks.assert_values_and_grads_close(scalar(run), scalar(reference),
                                       params, features)


def test_add_mixer_sums_the_branches_without_a_router():
  """MoME's "add" baseline: F = sum_i f_i, values and gradients."""
  run, params, features, _ = _connector_and_inputs(mixer="add")
  assert set(params) == set(ENCODERS)  # No router parameters.

  def reference(params, features):
    return sum(_branch_loop(params[name], x, encoder, side=3)
               for (name, encoder), x in zip(ENCODERS.items(), features))

  w = jax.random.normal(jax.random.key(7), (2, 9, DECODER_WIDTH))
  scalar = lambda f: jax.jit(lambda params, x: jnp.sum(f(params, x) * w))
  checks.assert_values_and_grads_close(scalar(run), scalar(reference),
                                       params, features)


def test_one_hot_router_gives_that_encoders_branch_alone():
  run, params, features, _ = _connector_and_inputs()
  run = jax.jit(run)
  out = params["router"]["out"]
  for chosen, (name, encoder) in enumerate(ENCODERS.items()):
    out["kernel"] = jnp.zeros_like(out["kernel"])
    out["bias"] = jnp.where(jnp.arange(len(ENCODERS)) == chosen, 50.0, -50.0)
    np.testing.assert_allclose(
        run(params, features),
        _branch_loop(params[name], features[chosen], encoder, side=3),
        rtol=1e-4, atol=1e-5)


def test_router_is_instance_level_and_its_weights_sum_to_one():
  model = VLM(_two_encoder_config(), rngs=nnx.Rngs(0))
  batch = _batch(model.config)
  with layers.recording_usage():
    _, reports = nnx.jit(lambda m, b: m.forward(**b))(model, batch)
  usage = np.asarray(reports["connector"]["usage"])
  assert usage.shape == (3, model.num_image_tokens, 2)
  # One weight vector per example, the same for all its tokens.
  np.testing.assert_array_equal(usage,
                                np.broadcast_to(usage[:, :1], usage.shape))
  np.testing.assert_allclose(usage.sum(-1), 1.0, rtol=1e-6)
  # Different prompts, different weights.
  assert np.abs(usage[0, 0] - usage[1, 0]).max() > 1e-4


# --- The VLM with two encoders -----------------------------------------------


def test_decoder_sees_the_connectors_token_count():
  config = _two_encoder_config(num_tokens=9)
  assert config.vit.num_patches == 4 and config.num_image_tokens == 9
  model = VLM(config, rngs=nnx.Rngs(0))
  image_tokens, _ = nnx.jit(lambda m, image: m.embed_image(
      image, instance=jnp.ones((3, 32))))(model, _batch(config)["image"])
  assert image_tokens.shape == (3, 9, 32)


def test_the_model_layer_loop_reaches_the_adt_layers():
  """model.scan_layers / remat_policy apply to MoVE's ADT tower too: unrolled,
  no layer loop is left in the image path, and it computes what the scanned
  one does."""
  config = _two_encoder_config(adt_depth=2)
  unrolled = dataclasses.replace(config, scan_layers=False,
                                 remat_policy="full")
  image = _batch(config)["image"]

  def embed(model_config):
    graphdef, state = nnx.split(VLM(model_config, rngs=nnx.Rngs(0)))
    run = lambda state, image: nnx.merge(graphdef, state).embed_image(
        image, instance=jnp.ones((3, 32)))[0]
    return jax.make_jaxpr(run)(state, image), jax.jit(run)(state, image)

  scanned_program, scanned = embed(config)
  unrolled_program, tokens = embed(unrolled)
  assert "scan" in str(scanned_program)
  assert "scan" not in str(unrolled_program)
  np.testing.assert_allclose(tokens, scanned, atol=1e-5)


def test_two_encoders_train_and_gradients_reach_both_and_the_router():
  model = VLM(_two_encoder_config(), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = _batch(model.config)
  loss_fn = lambda p: checks.next_token_loss(nnx.merge(graphdef, p), batch)
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = optimizer.init(params)
  losses = []
  for i in range(8):
    params, opt_state, loss, grads = step(params, opt_state)
    losses.append(float(loss))
    if i == 0:
      flat = nnx.to_flat_state(grads)
      norm = lambda prefix, flat=flat: sum(
          float(jnp.sum(v.get_value()**2)) for path, v in flat
          if "/".join(map(str, path)).startswith(prefix))
      for prefix in ("vit/", "vit_1/", "connector/vit/", "connector/vit_1/",
                     "connector/router/"):
        assert norm(prefix) > 0, prefix
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses


def test_cached_decoding_equals_the_full_forward():
  model = VLM(_two_encoder_config(num_tokens=9), rngs=nnx.Rngs(0))
  prompt, steps = 4, 4
  batch = _batch(model.config, prompt=prompt, suffix=steps)
  full = nnx.jit(lambda m, b: m(**b))(model, batch)

  n = model.num_image_tokens
  prompt_only = {k: v[:, :prompt] if k != "image" else v
                 for k, v in batch.items()}
  last, cache = nnx.jit(lambda m, b: m.prefill(
      **b, cache_length=n + prompt + steps))(model, prompt_only)
  np.testing.assert_allclose(last, full[:, prompt - 1], atol=1e-5)
  extend = nnx.jit(lambda m, t, c: m.extend(t, c))
  for t in range(steps - 1):
    logits, cache = extend(model, batch["text"][:, prompt + t], cache)
    np.testing.assert_allclose(logits, full[:, prompt + t], atol=1e-5)


def test_expert_regexes_reach_the_second_encoder_and_its_branch():
  fields = build.model_config_to_dict("tiny")
  fields.update(connector="move",
                extra_vits=(dataclasses.asdict(SECOND_ENCODER),))
  config = ml_collections.ConfigDict(dict(model=fields, experts=[
      dict(kind="sparse_moe", targets=r"vit_1/layers/\d+/mlp", num_experts=2,
           top_k=1),
      dict(kind="lora",
           targets=r"connector/vit_1/layers/\d+/cross_attn/(q|k|v|o)",
           rank=2)]))
  model = build.build_model(config)
  paths = {"/".join(map(str, p)) for p, _ in
           nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "vit_1/layers/mlp/router" in paths
  assert "connector/vit_1/layers/cross_attn/q/adapters/lora_1/a" in paths
  _, reports = nnx.jit(lambda m, b: m.forward(**b))(model,
                                                    _batch(model.config))
  assert set(reports) == {"vit_1/layers/mlp"}


# --- Config ----------------------------------------------------------------


def test_config_dict_round_trip_and_errors():
  config = _two_encoder_config(num_tokens=16, adt_depth=2, router_dim=8)
  fields = build.model_config_to_dict("tiny")
  fields.update(connector="move",
                extra_vits=(dataclasses.asdict(SECOND_ENCODER),),
                move=dict(num_tokens=16, adt_depth=2, router_dim=8))
  assert build.vlm_config(ml_collections.ConfigDict(fields)) == config

  with pytest.raises(ValueError, match="model.extra_vits is empty"):
    presets.get_preset("tiny", connector="move")
  with pytest.raises(ValueError, match="only model.connector='move'"):
    presets.get_preset("tiny", extra_vits=(SECOND_ENCODER,))
  with pytest.raises(ValueError, match="model.move.num_tokens=8 .* square"):
    MoVEConfig(num_tokens=8)
  with pytest.raises(ValueError, match="model.move.mixer='sum'.*'add'"):
    MoVEConfig(mixer="sum")
  with pytest.raises(ValueError, match="Unknown connector 'moe'.*'move'"):
    VLM(presets.get_preset("tiny", connector="moe"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mixer", ["router", "add"])
def test_flop_count_matches_xla_for_two_encoders(mixer):
  """As tests/test_flops.py: the traced program's matrix products are at
  most XLA's count, which exceeds them by the elementwise share only."""
  config = dataclasses.replace(_two_encoder_config(num_tokens=9, mixer=mixer),
                               scan_layers=False)  # XLA counts loops once.
  model = VLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = _batch(config, batch=8, prompt=12, suffix=12)
  grad = jax.grad(lambda p: checks.next_token_loss(nnx.merge(graphdef, p),
                                                   batch))
  cost = jax.jit(grad).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  counted = flops.count(grad, params).computed
  assert counted <= cost["flops"] <= 1.15 * counted, (cost["flops"], counted)


def _checkpoint(model, directory) -> str:
  """`model`'s parameters written as a checkpoint step directory."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "state", {
      "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "frozen": {}})
  checkpointer.wait_until_finished()
  return str(directory)


def _state(model):
  return trainer.TrainState(
      step=jnp.zeros((), jnp.int32), frozen={}, opt_state=(),
      params=nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_init_parts_load_each_encoder_from_the_run_that_trained_it(tmp_path):
  """MoME's encoders pretrained apart: init.checkpoint gives the first
  encoder (and the rest it shares), an init.parts entry the second encoder
  from another run's `vit`; the router, pooling and ADT stay fresh."""
  coarse = VLM(presets.get_preset("tiny"), rngs=nnx.Rngs(1))
  fine = VLM(dataclasses.replace(presets.get_preset("tiny"),
                                 vit=SECOND_ENCODER), rngs=nnx.Rngs(2))
  coarse_dir = _checkpoint(coarse, tmp_path / "coarse")
  fine_dir = _checkpoint(fine, tmp_path / "fine")
  fresh = _state(VLM(_two_encoder_config(), rngs=nnx.Rngs(3)))

  loaded = init_lib.load_partial(coarse_dir, fresh, fresh,
                                 parts=[("vit_1", fine_dir, "vit")])
  got = init_lib.flatten_by_path(loaded.params)
  before = init_lib.flatten_by_path(fresh.params)
  for source, prefix, model in (("vit", "vit", coarse), ("vit", "vit_1", fine),
                                ("decoder", "decoder", coarse)):
    want = init_lib.flatten_by_path(
        nnx.to_pure_dict(nnx.state(getattr(model, source), nnx.Param)))
    assert want
    for key, value in want.items():
      np.testing.assert_array_equal(got[f"{prefix}/{key}"], value)
  router = [key for key in got if key.startswith("connector/router/")]
  assert router
  for key in router:
    np.testing.assert_array_equal(got[key], before[key])

  # Parts alone, without init.checkpoint: the rest stays fresh.
  alone = init_lib.flatten_by_path(init_lib.load_partial(
      "", fresh, fresh, parts=[("vit_1", fine_dir, "vit")]).params)
  np.testing.assert_array_equal(alone["decoder/embedder/embedding"],
                                before["decoder/embedder/embedding"])
  np.testing.assert_array_equal(alone["vit_1/embedding/kernel"],
                                got["vit_1/embedding/kernel"])
  # A part takes precedence over init.checkpoint.
  other_dir = _checkpoint(VLM(presets.get_preset("tiny"), rngs=nnx.Rngs(4)),
                          tmp_path / "other")
  mixed = init_lib.flatten_by_path(init_lib.load_partial(
      coarse_dir, fresh, fresh, parts=[("vit", other_dir, "vit")]).params)
  other = init_lib.read_parameters(other_dir)
  np.testing.assert_array_equal(mixed["vit/embedding/kernel"],
                                other["vit/embedding/kernel"])
  np.testing.assert_array_equal(mixed["decoder/embedder/embedding"],
                                got["decoder/embedder/embedding"])

  with pytest.raises(ValueError, match=r"has no parameter under 'vit_2'"):
    init_lib.load_partial("", fresh, fresh,
                          parts=[("vit_1", fine_dir, "vit_2")])
  # The coarse encoder is not the shape of the second one.
  with pytest.raises(ValueError, match=r"vit_1/.* has shape .* there but"):
    init_lib.load_partial("", fresh, fresh,
                          parts=[("vit_1", coarse_dir, "vit")])


def test_schema_rejects_init_parts_that_are_not_triples():
  config = config_lib.load_config_file("configs/mome.py:preset=tiny")
  config.init.parts = (("vit_1", "/runs/fine"),)
  with pytest.raises(ValueError, match=r"init\.parts.*triples"):
    schema.check(config)


def test_init_reads_only_the_parameters_it_loads(tmp_path):
  """A checkpoint's optimizer state is never read, and an init.parts entry
  reads its subtree alone: taking one encoder from a big run must not hold
  the whole run in host memory. Sizes: 4 MB encoder, 32 MB decoder, 64 MB
  optimizer state; each read runs in a fresh process, which reports how
  far its peak resident memory rose during the read."""
  megabytes = lambda n: np.ones((n, 1024, 256), np.float32)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "run" / "state", {
      "params": {"vit": {"kernel": megabytes(4)},
                 "decoder": {"kernel": megabytes(32)}},
      "frozen": {}, "opt_state": {"mu": megabytes(64)}})
  checkpointer.wait_until_finished()
  run = str(tmp_path / "run")

  def read_in_fresh_process(read: str) -> tuple[list, float]:
    script = textwrap.dedent(f"""
        import gc, json
        from omnismola.train import init as init_lib
        def peak_mb():
          status = open("/proc/self/status").read().split("VmHWM:")[1]
          return int(status.split()[0]) / 1024
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # Resets the peak.
        before = peak_mb()
        out = {read}
        print(json.dumps([sorted(out), peak_mb() - before]))
        """)
    result = subprocess.run([sys.executable, "-c", script], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])

  keys, rise = read_in_fresh_process(f"init_lib.read_parameters({run!r})")
  assert keys == ["decoder/kernel", "vit/kernel"]
  assert rise < 100, rise  # Parameters (36 MB), not the optimizer state.
  keys, rise = read_in_fresh_process(
      f"init_lib.read_part('vit_1', {run!r}, 'vit')")
  assert keys == ["vit_1/kernel"]
  assert rise < 30, rise  # The encoder, not the 32 MB decoder.
