"""sparse_lora: routed LoRA/adapter experts (Awaker2.5-VL, MoME's MoLE)
against a loop reference, attached to linears and MLP blocks, in cached
decoding, with shared gates and upcycled from a LoRA."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from omnismola import build
from omnismola.experts import attach
from omnismola.experts.sparse_lora import SparseLoRA, top_k_weights
from omnismola.models import presets
from omnismola.models import layers
from omnismola.models.layers import TokenInfo
from omnismola.models.vlm import VLM
from omnismola.train import init as init_lib
from omnismola.train import trainer

import checks

B, T, D_IN, D_OUT, D_INSTANCE, E = 2, 6, 12, 10, 8, 3
DECODER_WIDTH = presets.get_preset("tiny").decoder.width
# Awaker's placement: o has its own gate, gate/up/down share one.
AWAKER_TARGETS = r"decoder/layers/\d+/(attn/o|mlp/(gate|up|down))"


def _tokens(instance=True) -> TokenInfo:
  """Two sequences, the second ending in two padding tokens."""
  valid = np.ones((B, T), bool)
  valid[1, 4:] = False
  bidirectional = np.zeros((B, T), bool)
  bidirectional[:, :3] = True
  return TokenInfo(
      is_image=jnp.zeros((B, T), bool), valid=jnp.asarray(valid),
      bidirectional=jnp.asarray(bidirectional & valid),
      # Each token's example vector; they differ within a row as in a
      # packed row.
      instance=(jax.random.normal(jax.random.key(7), (B, T, D_INSTANCE))
                if instance else None))


def _reference(params, x, tokens, *, routing, top_k=1, activation=None,
               multiplier=1.0):
  """The routed adapter as loops over examples, tokens and experts.

  Expert e is chosen where fewer than top_k experts have a larger
  probability; its weight is its probability.
  """
  act = jax.nn.relu if activation == "relu" else (lambda h: h)
  kernel, experts = params["router"]["kernel"], params["experts"]
  valid = np.asarray(tokens.valid)
  rows = []
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      y = jnp.zeros(experts["b"].shape[-1])
      if valid[b, t]:
        u = tokens.instance[b, t] if routing == "instance" else x[b, t]
        probs = jax.nn.softmax(u @ kernel)
        for e in range(kernel.shape[-1]):
          chosen = jnp.sum(probs > probs[e]) < top_k
          expert = act(x[b, t] @ experts["a"][e]) @ experts["b"][e]
          y = y + jnp.where(chosen, probs[e], 0.0) * expert
        if "global_expert" in params:
          g = params["global_expert"]
          y = y + (1 - jnp.max(probs)) * (act(x[b, t] @ g["a"]) @ g["b"])
      rows.append(y * multiplier * params.get("scale", 1.0))
  return jnp.stack(rows).reshape(x.shape[:2] + (-1,))


@pytest.mark.parametrize("options", [
    dict(routing="token", top_k=2),
    dict(routing="instance", top_k=1, global_expert=True),
    dict(routing="token", top_k=1, global_expert=True, activation="relu",
         learned_scale=True, alpha=8.0),
    dict(routing="instance", top_k=2, activation="relu"),
], ids=["token_top2", "instance_global", "token_adapter", "instance_top2"])
def test_matches_loop_reference_outputs_and_gradients(options):
  adapter = checks.randomized(SparseLoRA(
      D_IN, D_OUT, num_experts=E, rank=4, instance_features=D_INSTANCE,
      rngs=nnx.Rngs(0), **options))
  tokens = _tokens()
  x = checks.assert_matches_reference(
      adapter, lambda params, x: _reference(
          params, x, tokens, routing=options["routing"],
          top_k=options["top_k"], activation=options.get("activation"),
          multiplier=options.get("alpha", 4.0) / 4),
      tokens, in_features=D_IN, out_features=D_OUT)
  np.testing.assert_array_equal(adapter(x, tokens)[1, 4:], 0)  # Padding.


@pytest.mark.parametrize("routing", ["instance", "token"])
def test_starts_with_zero_output(routing):
  adapter = SparseLoRA(D_IN, D_OUT, num_experts=E, rank=4, routing=routing,
                       global_expert=True, activation="relu",
                       learned_scale=True, instance_features=D_INSTANCE,
                       rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (B, T, D_IN))
  np.testing.assert_array_equal(adapter(x, _tokens()), 0)


def test_top_k_weights_keep_the_chosen_probabilities():
  probs = jnp.asarray([[0.1, 0.5, 0.4], [0.6, 0.1, 0.3]])
  weights, top = top_k_weights(probs, 2)
  np.testing.assert_allclose(weights, [[0.0, 0.5, 0.4], [0.6, 0.0, 0.3]])
  np.testing.assert_allclose(top, [0.5, 0.6])


@pytest.mark.parametrize("top_k", [1, 2])
def test_global_expert_takes_one_minus_the_top_gate(top_k):
  """Every expert a copy of the global one: the output is that LoRA times
  (chosen gates + 1 - top gate), exactly the LoRA for top-1 (Awaker)."""
  adapter = checks.randomized(SparseLoRA(
      D_IN, D_OUT, num_experts=E, rank=4, top_k=top_k, global_expert=True,
      instance_features=D_INSTANCE, rngs=nnx.Rngs(0)))
  a, b = adapter.global_expert.a[...], adapter.global_expert.b[...]
  adapter.experts.a.set_value(jnp.stack([a] * E))
  adapter.experts.b.set_value(jnp.stack([b] * E))
  tokens = _tokens()
  x = jax.random.normal(jax.random.key(2), (B, T, D_IN))
  probs = np.asarray(jax.nn.softmax(
      tokens.instance @ adapter.router.kernel[...]))
  gates = np.sort(probs, axis=-1)[..., ::-1][..., :top_k]   # [B, T, k]
  scale = gates.sum(-1) + 1 - gates[..., 0]
  want = scale[..., None] * np.asarray(x @ a @ b)
  want[~np.asarray(tokens.valid)] = 0
  np.testing.assert_allclose(adapter(x, tokens), want, rtol=1e-5, atol=1e-5)
  if top_k == 1:
    np.testing.assert_allclose(scale, 1.0, rtol=1e-6)


def test_instance_routing_without_an_instance_fails_clearly():
  adapter = SparseLoRA(D_IN, D_OUT, num_experts=E, rank=2,
                       instance_features=D_INSTANCE, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs TokenInfo.instance"):
    adapter(jnp.ones((B, T, D_IN)), _tokens(instance=False))


@pytest.mark.parametrize("entry, message", [
    (dict(routing="tokens"), r"experts\[0\].*blk/q.*routing='tokens'.*"
     r"'instance', 'token'"),
    (dict(activation="gelu"), r"blk/q.*activation='gelu'.*None, 'relu'"),
    (dict(top_k=4), r"blk/q.*top_k <= num_experts"),
    (dict(), r"experts\[0\].*instance_features"),  # The plan has no width.
])
def test_bad_options_fail_clearly(entry, message):
  holder = nnx.Module()
  holder.blk = nnx.Module()
  holder.blk.q = layers.Dense(D_IN, D_OUT, axes=(None, None), use_bias=False,
                              rngs=nnx.Rngs(0))
  plan = attach.make_plan([dict(kind="sparse_lora", targets="blk/q",
                                num_experts=E, rank=2, **entry)], holder)
  with pytest.raises(ValueError, match=message):
    plan.attach(holder, "", nnx.Rngs(0))


# --- In the model ------------------------------------------------------------


def _model(experts=(), seed=0, **overrides) -> VLM:
  config = presets.get_preset("tiny", **dict(dict(decoder_depth=2),
                                             **overrides))
  return VLM(config, plan=build.expert_plan(experts, config),
             rngs=nnx.Rngs(seed))


def _entry(targets, **options):
  return dict(dict(kind="sparse_lora", targets=targets, num_experts=E,
                   rank=4), **options)


def _flat_params(model) -> dict:
  return {"/".join(map(str, path)): v.get_value() for path, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _batch(model, prompt_lens, steps, seed=0):
  """Images and [prompt, suffix, padding] rows: full texts and masks, and
  the prompts alone (padded to the longest)."""
  batch, prompt_len = len(prompt_lens), max(prompt_lens)
  size = model.config.vit.image_size
  image = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3),
                             minval=-1, maxval=1)
  text = np.array(jax.random.randint(
      jax.random.key(seed + 1), (batch, prompt_len + steps), 3, 259))
  mask_ar = np.zeros_like(text)
  mask_input = np.zeros_like(text)
  for b, p in enumerate(prompt_lens):
    text[b, p + steps:] = 0
    mask_ar[b, p:p + steps] = 1
    mask_input[b, :p + steps] = 1
  prompt_input = np.arange(prompt_len) < np.asarray(prompt_lens)[:, None]
  prompt = (image, jnp.asarray(text[:, :prompt_len] * prompt_input),
            jnp.zeros((batch, prompt_len), jnp.int32),
            jnp.asarray(prompt_input, jnp.int32))
  return (image, *map(jnp.asarray, (text, mask_ar, mask_input))), prompt


_forward = nnx.jit(lambda model, *batch: model(*batch))
_adapters_only = lambda path: "/adapters/" in path

EVERYWHERE = [
    _entry(AWAKER_TARGETS, global_expert=True, share_gate=True),
    _entry(r"decoder/layers/\d+/mlp", activation="relu", learned_scale=True),
    _entry(r"vit/layers/\d+/mlp", routing="token"),
    _entry(r"decoder/layers/\d+/attn/(q|k|v)", routing="token", top_k=2),
]


def test_zero_init_computes_the_base_model_and_keeps_its_paths():
  """Same base weights with and without the adapters: the same logits.
  The dense blocks' and linears' parameters keep their paths."""
  plain = _model(connector="mlp")
  adapted = _model(EVERYWHERE + [_entry("connector/mlp", top_k=2)],
                   connector="mlp")
  base, full = _flat_params(plain), _flat_params(adapted)
  assert {p: v.shape for p, v in full.items() if p in base} == {
      p: v.shape for p, v in base.items()}
  assert "decoder/layers/mlp/adapters/sparse_lora_1/experts/a" in full
  assert "connector/mlp/adapters/sparse_lora_4/router/kernel" in full
  nnx.update(adapted, nnx.state(plain, nnx.Param))
  (batch, _) = _batch(plain, [4, 2], 3)
  # Every adapter adds exact zeros (test_starts_with_zero_output), but the
  # adapted program fuses the ViT's ops differently, which rounds
  # differently in the last bits.
  np.testing.assert_allclose(_forward(adapted, *batch),
                             _forward(plain, *batch), rtol=0, atol=1e-5)
  # The adapters are live: random B matrices change the logits.
  moved = checks.randomized(adapted, where=_adapters_only)
  assert np.abs(_forward(moved, *batch) - _forward(plain, *batch)).max() > 1e-3


def test_instance_routing_is_fixed_while_decoding():
  """prefill + extend equal the full forward at every step: the routers see
  the prompt's embedding, never the generated tokens."""
  model = checks.randomized(_model(EVERYWHERE[:2]), where=_adapters_only)
  prompt_lens, steps = [4, 2], 3
  full_batch, prompt = _batch(model, prompt_lens, steps)
  full = _forward(model, *full_batch)
  n = model.num_image_tokens
  last, cache = nnx.jit(lambda m, *a: m.prefill(
      *a, cache_length=n + max(prompt_lens) + steps))(model, *prompt)
  rows, at = np.arange(len(prompt_lens)), np.asarray(prompt_lens) - 1
  np.testing.assert_allclose(last, full[rows, at], atol=1e-5)
  extend = nnx.jit(lambda m, t, c: m.extend(t, c))
  for t in range(steps):
    logits, cache = extend(model, full_batch[1][rows, at + t + 1], cache)
    np.testing.assert_allclose(logits, full[rows, at + t + 1], atol=1e-5)


def test_token_routing_in_the_decoder_is_causal():
  model = checks.randomized(_model([
      _entry(r"decoder/layers/\d+/mlp", routing="token", global_expert=True),
      _entry(r"decoder/layers/\d+/mlp/(gate|up)", routing="token",
             share_gate=True)]), where=_adapters_only)
  (image, text, mask_ar, mask_input), _ = _batch(model, [2, 2], 4)
  before = _forward(model, image, text, mask_ar, mask_input)
  for t in (3, 5):
    after = _forward(model, image, text.at[:, t].set(7), mask_ar, mask_input)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0,
                               atol=1e-6)
    assert np.abs(after[:, t:] - before[:, t:]).max() > 1e-3


def test_share_gate_builds_one_router_per_block():
  model = _model([_entry(AWAKER_TARGETS, share_gate=True),
                  _entry(AWAKER_TARGETS)])
  routers = sorted(p for p in _flat_params(model)
                   if p.endswith("/router/kernel"))
  assert routers == [
      "decoder/layers/attn/o/adapters/sparse_lora_0/router/kernel",
      "decoder/layers/attn/o/adapters/sparse_lora_1/router/kernel",
      "decoder/layers/mlp/down/adapters/sparse_lora_0/router/kernel",
      "decoder/layers/mlp/down/adapters/sparse_lora_1/router/kernel",
      "decoder/layers/mlp/gate/adapters/sparse_lora_1/router/kernel",
      "decoder/layers/mlp/up/adapters/sparse_lora_1/router/kernel",
  ]
  mlp = model.decoder.layers.mlp
  shared = {id(getattr(mlp, name).adapters["sparse_lora_0"].router)
            for name in ("gate", "up", "down")}
  assert len(shared) == 1
  kernel = mlp.gate.adapters["sparse_lora_0"].router.kernel
  assert kernel.shape == (2, DECODER_WIDTH, E)  # [layers, embed, expert].
  assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "expert")


def test_token_routed_shared_gate_needs_one_input_width():
  with pytest.raises(ValueError, match="(?s)mlp/gate.*share_gate.*32.*64"):
    _model([_entry(r"decoder/layers/\d+/mlp/(gate|up|down)", routing="token",
                   share_gate=True)])


def test_attachment_errors_name_the_entries_and_candidates():
  with pytest.raises(ValueError, match=r"(?s)matched no linear layer or MLP "
                     r"block.*linear layers are:.*decoder/layers/1/mlp/up"
                     r".*MLP blocks are:.*decoder/layers/1/mlp"):
    _model([_entry(r"decoder/layers/\d+/ffn")])
  with pytest.raises(ValueError, match=r"experts\[1\].*beside.*connector/mlp"
                     r".*experts\[0\] \(sparse_moe\) replaces"):
    _model([dict(kind="sparse_moe", targets="connector/mlp", num_experts=2,
                 top_k=1), _entry("connector/mlp")], connector="mlp")


def test_load_partial_upcycles_a_lora_into_every_expert(tmp_path):
  """Awaker's stage II from stage I: each expert and the global expert start
  as the LoRA at their layer, the router stays fresh, and with top-1 the
  model computes stage I's logits."""
  lora = lambda targets: dict(kind="lora", targets=targets, rank=4)
  stage1 = checks.randomized(
      _model([lora(r"decoder/layers/\d+/attn/(q|k|v)"), lora(AWAKER_TARGETS)]),
      where=_adapters_only)
  stage2 = _model([lora(r"decoder/layers/\d+/attn/(q|k|v)"),
                   _entry(AWAKER_TARGETS, global_expert=True,
                          share_gate=True)], seed=1)
  saved = {"params": nnx.to_pure_dict(nnx.state(stage1, nnx.Param)),
           "frozen": {}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", saved)
  checkpointer.wait_until_finished()
  fresh = trainer.TrainState(
      step=jnp.zeros((), jnp.int32), frozen={}, opt_state=(),
      params=nnx.to_pure_dict(nnx.state(stage2, nnx.Param)))
  loaded = init_lib.load_partial(str(tmp_path), fresh, fresh)

  source, got = _flat_params(stage1), init_lib.flatten_by_path(loaded.params)
  before = init_lib.flatten_by_path(fresh.params)
  for name in ("attn/o", "mlp/gate", "mlp/up", "mlp/down"):
    layer = f"decoder/layers/{name}/adapters"
    for m in ("a", "b"):
      want = source[f"{layer}/lora_1/{m}"]    # [layers, ...]
      np.testing.assert_array_equal(
          got[f"{layer}/sparse_lora_1/global_expert/{m}"], want)
      for e in range(E):
        np.testing.assert_array_equal(
            got[f"{layer}/sparse_lora_1/experts/{m}"][:, e], want)
  for path in got:
    if "/router/" in path:
      np.testing.assert_array_equal(got[path], before[path])
  _, state = nnx.split(stage2)
  nnx.replace_by_pure_dict(state, loaded.params)
  nnx.update(stage2, state)
  (batch, _) = _batch(stage1, [4, 2], 3)
  real = np.asarray(batch[3], bool)  # LoRA, unlike sparse_lora, moves padding.
  np.testing.assert_allclose(_forward(stage2, *batch)[real],
                             _forward(stage1, *batch)[real], atol=1e-5)
