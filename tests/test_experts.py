"""Experts: SMoLA and LoRA against plain per-expert loop references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnismola.experts import attach
from omnismola.experts import routing
from omnismola.experts.lora import LoRA
from omnismola.experts.smola import SMoLA, SMoLAPool
from omnismola.models import layers, stack
from omnismola.models.layers import TokenInfo

import checks

B, T, D_IN, D_OUT = 2, 7, 12, 10


def _tokens():
  """Two sequences: image+prefix (bidirectional), suffix, and padding."""
  is_image = np.zeros((B, T), bool)
  is_image[:, :3] = True
  valid = np.ones((B, T), bool)
  valid[1, 5:] = False  # Second sequence is padded.
  bidirectional = np.zeros((B, T), bool)
  bidirectional[0, :5] = True   # 3 image + 2 prefix tokens.
  bidirectional[1, :4] = True   # 3 image + 1 prefix token.
  return TokenInfo(is_image=jnp.asarray(is_image), valid=jnp.asarray(valid),
                   bidirectional=jnp.asarray(bidirectional & valid))


def _reference_pool(x, tokens, modality, a, b, phi, scale, multiplier):
  """Soft MoE / per-token mixing written as loops over tokens and experts."""
  n, p = phi.shape[1], phi.shape[2]
  serves = {"text": tokens.is_text, "image": tokens.is_image & tokens.valid,
            "all": tokens.valid}[modality]
  out = []
  for bi in range(x.shape[0]):
    logits = jnp.stack([jnp.stack([jnp.stack([
        scale * jnp.dot(x[bi, t] / jnp.sqrt(jnp.sum(x[bi, t]**2) + 1e-6),
                        phi[:, j, s] / jnp.sqrt(jnp.sum(phi[:, j, s]**2) + 1e-6))
        for s in range(p)]) for j in range(n)]) for t in range(x.shape[1])])
    combine = jax.nn.softmax(logits.reshape(x.shape[1], -1), axis=-1).reshape(
        x.shape[1], n, p)
    group = [t for t in range(x.shape[1])
             if serves[bi, t] and tokens.bidirectional[bi, t]]
    slot_out = {}
    if group:
      for j in range(n):
        for s in range(p):
          d = jax.nn.softmax(jnp.stack([logits[t, j, s] for t in group]))
          xs = sum(d[i] * x[bi, t] for i, t in enumerate(group))
          slot_out[j, s] = xs @ a[:, j, :] @ b[j]
    rows = []
    for t in range(x.shape[1]):
      y = jnp.zeros(b.shape[-1])
      if serves[bi, t] and tokens.bidirectional[bi, t]:
        for j in range(n):
          for s in range(p):
            y = y + combine[t, j, s] * slot_out[j, s]
      elif serves[bi, t]:
        for j in range(n):
          y = y + jnp.sum(combine[t, j]) * (x[bi, t] @ a[:, j, :] @ b[j])
      rows.append(y)
    out.append(jnp.stack(rows))
  return multiplier * jnp.stack(out)


@pytest.mark.parametrize("modality", ["text", "image", "all"])
@pytest.mark.parametrize("slots", [1, 2])
def test_smola_pool_matches_loop_reference_outputs_and_gradients(modality,
                                                                   slots):
  pool = checks.randomized(SMoLAPool(
      D_IN, D_OUT, modality=modality, num_experts=3, rank=2,
      slots_per_expert=slots, alpha=4.0, rngs=nnx.Rngs(0)))
  tokens = _tokens()
  checks.assert_matches_reference(
      pool, lambda params, x: _reference_pool(
          x, tokens, modality, params["a"], params["b"], params["phi"],
          params["scale"], pool.multiplier),
      tokens, in_features=D_IN, out_features=D_OUT)


def test_smola_tokens_outside_the_pool_get_nothing():
  pool = checks.randomized(SMoLAPool(D_IN, D_OUT, modality="text",
                                     num_experts=2, rank=2, rngs=nnx.Rngs(0)))
  tokens = _tokens()
  y = pool(jax.random.normal(jax.random.key(0), (B, T, D_IN)), tokens)
  np.testing.assert_array_equal(np.asarray(y)[~np.asarray(tokens.is_text)], 0)


def test_smola_causal_tokens_depend_only_on_themselves():
  """Changing a later token never changes an earlier token's output."""
  pool = checks.randomized(SMoLA(D_IN, D_OUT,
                                 pools=dict(text=2, image=2, all=2), rank=2,
                                 rngs=nnx.Rngs(0)))
  tokens = _tokens()
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  y = pool(x, tokens)
  x2 = x.at[0, 6].set(5.0)  # The last suffix token of sequence 0.
  y2 = pool(x2, tokens)
  np.testing.assert_allclose(y[0, :6], y2[0, :6], atol=1e-6)
  assert not np.allclose(y[0, 6], y2[0, 6])


def test_smola_per_token_path_equals_one_token_at_a_time():
  """Cached decoding sees one suffix token at a time: same outputs."""
  pool = checks.randomized(SMoLA(D_IN, D_OUT, pools=dict(text=3, all=2),
                                 rank=2, rngs=nnx.Rngs(0)))
  tokens = _tokens()
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  full = pool(x, tokens)
  for t in (5, 6):
    one = TokenInfo(is_image=jnp.zeros((1, 1), bool),
                    valid=jnp.ones((1, 1), bool),
                    bidirectional=jnp.zeros((1, 1), bool))
    np.testing.assert_allclose(pool(x[:1, t:t + 1], one)[0, 0], full[0, t],
                               rtol=1e-5, atol=1e-6)


def test_smola_sequence_without_pool_tokens_is_finite():
  pool = checks.randomized(SMoLAPool(D_IN, D_OUT, modality="image",
                                     num_experts=2, rank=2, rngs=nnx.Rngs(0)))
  tokens = TokenInfo(is_image=jnp.zeros((1, 4), bool),
                     valid=jnp.ones((1, 4), bool),
                     bidirectional=jnp.ones((1, 4), bool))
  x = jax.random.normal(jax.random.key(0), (1, 4, D_IN))
  grads = jax.grad(lambda x: jnp.sum(pool(x, tokens)))(x)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(pool(x, tokens), 0)


def test_zero_initialised_adapters_compute_the_base_layer():
  layer = checks.with_experts(
      [dict(kind="smola", targets="blk/.*", pools=dict(text=2, image=2, all=2),
            rank=2),
       dict(kind="lora", targets="blk/q", rank=3)],
      checks.linear(D_IN, D_OUT, axes=("embed", "heads"), use_bias=True))
  assert sorted(layer.adapters) == ["lora_1", "smola_0"]
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  base = x @ layer.kernel[...] + layer.bias[...]
  np.testing.assert_array_equal(layer(x, _tokens()), base)


def test_lora_matches_reference():
  lora = checks.randomized(LoRA(D_IN, D_OUT, rank=3, alpha=6.0,
                                rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  want = 2.0 * np.einsum("btd,dr,ro->bto", x, lora.a[...], lora.b[...])
  np.testing.assert_allclose(lora(x, _tokens()), want, rtol=1e-5, atol=1e-5)


def test_an_entry_that_matches_nothing_names_the_layers():
  with pytest.raises(ValueError,
                     match="(?s)experts.0. .lora.*matched no linear layer.*"
                     "The model's linear layers are:\n  blk/q"):
    checks.with_experts([dict(kind="lora", targets="blk/k", rank=2)],
                        checks.linear(D_IN, D_OUT))


class _Layer(nnx.Module):

  def __init__(self, rngs):
    self.q = layers.Dense(D_IN, D_OUT, axes=(None, None), use_bias=False,
                          rngs=rngs)


class _Tower(nnx.Module):
  """Any module with a tower: three stacked layers at `dec/layers`."""

  def __init__(self, plan=stack.Plan(), rngs=None):
    self.dec = nnx.Module()
    self.segments = stack.add_tower_layers(
        self.dec, "layers", _Layer, 3, plan.child("dec"), rngs)
    plan.attach(self, "", rngs)


def test_stacked_layers_are_named_per_layer_and_split_where_experts_differ():
  backbone = nnx.eval_shape(lambda: _Tower(rngs=nnx.Rngs(0)))
  sites = attach.find_sites(backbone)
  assert [(s.path, s.names) for s in sites] == [
      ("dec/layers/q", ("dec/layers/0/q", "dec/layers/1/q", "dec/layers/2/q"))]
  plan = attach.make_plan([dict(kind="lora", targets=r"dec/layers/(1|2)/q",
                                rank=2)], backbone)
  model = _Tower(plan, nnx.Rngs(0))
  assert model.segments == (stack.Segment("dec/layers_0_1", 0, 1),
                            stack.Segment("dec/layers_1_3", 1, 3))
  assert model.dec.layers_0_1.q.adapters is None
  # The adapter was built inside the stacked constructor: a layer axis.
  assert model.dec.layers_1_3.q.adapters["lora_0"].a.shape == (2, D_IN, 2)


@pytest.mark.parametrize("entry, message", [
    (dict(kind="sparse_thing", targets=".*"), "unknown kind"),
    (dict(kind="lora", rank=2), "targets"),
    (dict(kind="lora", targets="(", rank=2), "bad targets regex"),
])
def test_bad_expert_specs_fail_clearly(entry, message):
  with pytest.raises(ValueError, match=message):
    checks.with_experts([entry], checks.linear(D_IN, D_OUT))


def test_unknown_adapter_option_names_the_layer():
  with pytest.raises(ValueError, match="experts\\[0\\].*blk/q.*rnak"):
    checks.with_experts([dict(kind="lora", targets=".*", rank=2, rnak=3)],
                        checks.linear(D_IN, D_OUT))


def test_masked_softmax_all_masked_gives_zeros():
  out = routing.masked_softmax(jnp.ones((2, 3)), jnp.zeros((2, 3), bool),
                               axis=1)
  np.testing.assert_array_equal(out, 0)
