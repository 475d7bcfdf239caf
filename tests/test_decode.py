"""Greedy KV-cached decoding against re-running the full forward each step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnismola.eval import decode
from omnismola.experts import attach
from omnismola.models import presets
from omnismola.models.vlm import VLM

PROMPT_LENS = [5, 2, 4]   # Different lengths: padding in the middle of cache.
PROMPT_LEN = 5
NEW = 6
NEVER = -1                # An eos_id no token has: always decode NEW tokens.


@pytest.fixture(scope="module")
def model():
  """A random model whose next token depends on the whole context.

  At init the tied embedding dominates the residual stream, so a random
  model mostly repeats its last token, and a broken cache would go unseen.
  Tripling every weight (plus noise) lets attention and MLPs steer it.
  """
  config = presets.get_preset("tiny", decoder_depth=2)
  return _sharpened(VLM(config, rngs=nnx.Rngs(0)))


def _sharpened(model):
  """Every weight tripled (see `model`); adapters' zero B matrices filled."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(3)
  leaves = [3 * x + 0.3 * rng.standard_normal(x.shape, np.float32)
            for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture(scope="module")
def prompt(model):
  batch = len(PROMPT_LENS)
  size = model.config.vit.image_size
  image = jax.random.uniform(jax.random.key(0), (batch, size, size, 3),
                             minval=-1, maxval=1)
  text = np.asarray(jax.random.randint(jax.random.key(1), (batch, PROMPT_LEN),
                                       3, 259, dtype=jnp.int32))
  mask_input = (np.arange(PROMPT_LEN) < np.array(PROMPT_LENS)[:, None])
  return dict(image=image, text=jnp.asarray(text * mask_input),
              mask_ar=jnp.zeros((batch, PROMPT_LEN), jnp.int32),
              mask_input=jnp.asarray(mask_input.astype(np.int32)))


def _uncached_greedy(model, prompt, steps):
  """Re-runs the whole [image, prompt, generated so far] for every token."""
  forward = nnx.jit(lambda m, *a: m(*a))
  batch = len(PROMPT_LENS)
  length = PROMPT_LEN + steps
  generated = np.zeros((batch, 0), np.int32)
  for _ in range(steps):
    text = np.zeros((batch, length), np.int32)
    mask_ar = np.zeros((batch, length), np.int32)
    mask_input = np.zeros((batch, length), np.int32)
    for b, p in enumerate(PROMPT_LENS):
      n = generated.shape[1]
      text[b, :p] = np.asarray(prompt["text"])[b, :p]
      text[b, p:p + n] = generated[b]
      mask_ar[b, p:p + n] = 1
      mask_input[b, :p + n] = 1
    logits = forward(model, prompt["image"], jnp.asarray(text),
                     jnp.asarray(mask_ar), jnp.asarray(mask_input))
    last = np.array(PROMPT_LENS) + generated.shape[1] - 1
    nxt = np.argmax(np.asarray(logits)[np.arange(batch), last], axis=-1)
    generated = np.concatenate([generated, nxt[:, None].astype(np.int32)], 1)
  return generated


def test_greedy_decode_equals_uncached_argmax(model, prompt):
  tokens = decode.greedy_decode(model, prompt, max_new_tokens=NEW,
                                eos_id=NEVER)
  assert tokens.shape == (len(PROMPT_LENS), NEW) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, _uncached_greedy(model, prompt, NEW))
  # Meaningful only if each example's tokens change along the way.
  assert all(len(np.unique(row)) > 1 for row in np.asarray(tokens))


def test_tokens_after_eos_are_padding(model, prompt):
  free = np.asarray(decode.greedy_decode(model, prompt, max_new_tokens=NEW,
                                         eos_id=NEVER))
  eos = int(free[0, 2])   # Pretend the token example 0 says third is EOS.
  tokens = np.asarray(decode.greedy_decode(model, prompt,
                                           max_new_tokens=NEW, eos_id=eos))
  for row, free_row in zip(tokens, free):
    hits = np.flatnonzero(free_row == eos)
    end = hits[0] + 1 if len(hits) else NEW
    np.testing.assert_array_equal(row[:end], free_row[:end])
    np.testing.assert_array_equal(row[end:], decode.PAD_ID)
  assert (tokens[0, 3:] == decode.PAD_ID).all()


def test_compiles_once_and_runs_inside_jit(model, prompt):
  """The trainer calls greedy_decode on a model merged inside jax.jit."""
  decode._greedy_decode.clear_cache()
  first = decode.greedy_decode(model, prompt, max_new_tokens=NEW,
                               eos_id=NEVER)
  other = dict(prompt, text=(prompt["text"] + 1) * prompt["mask_input"])
  decode.greedy_decode(model, other, max_new_tokens=NEW, eos_id=NEVER)
  assert decode._greedy_decode._cache_size() == 1

  graphdef, state = nnx.split(model)

  @jax.jit
  def jitted(state, batch):
    return decode.greedy_decode(nnx.merge(graphdef, state), batch,
                                max_new_tokens=NEW, eos_id=NEVER)

  np.testing.assert_array_equal(jitted(state, prompt), first)


def test_token_routed_experts_decode_as_they_train(prompt):
  """SMoLA routes by TokenInfo; prefill/extend must hand it the same facts.

  Image + prompt tokens are one Soft MoE group, generated tokens are causal
  and routed one by one, so cached decoding equals the full forward.
  """
  factory = attach.make_linear_factory([dict(
      kind="smola", targets=r"decoder/.*/(attn/q|mlp/up)",
      pools=dict(text=3, image=3, all=2), rank=2)])
  config = presets.get_preset("tiny", decoder_depth=2)
  model = _sharpened(VLM(config, make_linear=factory, rngs=nnx.Rngs(0)))
  tokens = decode.greedy_decode(model, prompt, max_new_tokens=NEW,
                                eos_id=NEVER)
  np.testing.assert_array_equal(tokens, _uncached_greedy(model, prompt, NEW))
