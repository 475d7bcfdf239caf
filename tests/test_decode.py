"""KV-cached decoding against re-running the full forward (uncached)."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnismola import build
from omnismola.eval import decode
from omnismola.models import presets
from omnismola.models.vlm import VLM

PROMPT_LENS = [5, 2, 4]   # Different lengths: padding in the middle of cache.
PROMPT_LEN = 5
NEW = 6
NEVER = -1                # An eos_id no token has: always decode NEW tokens.

# Exhaustive beam search: every continuation of SMALL_NEW tokens over a
# SMALL_VOCAB vocabulary is scored by the uncached model.
SMALL_VOCAB = 8
SMALL_NEW = 3
SMALL_LENS = [4, 2]
SMALL_EOS = 3             # Reachable; the best hypothesis of example 0 ends
                          # with it early, and greedy misses it.

_forward = nnx.jit(lambda m, *a: m(*a))


def _sharpened(model):
  """Every weight tripled (plus noise); adapters' zero B matrices filled.

  At init the tied embedding dominates the residual stream, so a random
  model mostly repeats its last token, and a broken cache would go unseen.
  Tripling every weight lets attention and MLPs steer it.
  """
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(3)
  leaves = [3 * x + 0.3 * rng.standard_normal(x.shape, np.float32)
            for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _prompt(model, lens, length, vocab, seed=0):
  """Random images and prompts of `lens` tokens, padded to `length`."""
  batch = len(lens)
  size = model.config.vit.image_size
  image = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3),
                             minval=-1, maxval=1)
  text = np.asarray(jax.random.randint(jax.random.key(seed + 1),
                                       (batch, length), 3, vocab,
                                       dtype=jnp.int32))
  mask_input = (np.arange(length) < np.array(lens)[:, None])
  return dict(image=image, text=jnp.asarray(text * mask_input),
              mask_ar=jnp.zeros((batch, length), jnp.int32),
              mask_input=jnp.asarray(mask_input.astype(np.int32)))


@pytest.fixture(scope="module")
def model():
  """A random model whose next token depends on the whole context."""
  config = presets.get_preset("tiny", decoder_depth=2)
  return _sharpened(VLM(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def prompt(model):
  return _prompt(model, PROMPT_LENS, PROMPT_LEN, vocab=259)


@pytest.fixture(scope="module")
def small_model():
  # A seed where the asserted non-trivialities hold: greedy misses the best
  # hypothesis and the length penalty changes the winner.
  config = presets.get_preset("tiny", decoder_depth=2,
                              decoder_vocab_size=SMALL_VOCAB)
  return _sharpened(VLM(config, rngs=nnx.Rngs(4)))


@pytest.fixture(scope="module")
def small_prompt(small_model):
  return _prompt(small_model, SMALL_LENS, max(SMALL_LENS), vocab=SMALL_VOCAB)


def _log_probs(model, prompt, lens, generated):
  """Uncached log-probs [B, T, V] of each generated position, one pass.

  Runs [image, prompt, generated] through the full model; generated tokens
  are causal, so position t's distribution ignores tokens t, t + 1, ...
  """
  generated = np.asarray(generated)
  batch, steps = generated.shape
  length = prompt["text"].shape[1] + steps
  text = np.zeros((batch, length), np.int32)
  mask_ar = np.zeros((batch, length), np.int32)
  mask_input = np.zeros((batch, length), np.int32)
  for b, p in enumerate(lens):
    text[b, :p] = np.asarray(prompt["text"])[b, :p]
    text[b, p:p + steps] = generated[b]
    mask_ar[b, p:p + steps] = 1
    mask_input[b, :p + steps] = 1
  logits = _forward(model, prompt["image"], jnp.asarray(text),
                    jnp.asarray(mask_ar), jnp.asarray(mask_input))
  index = np.array(lens)[:, None] - 1 + np.arange(steps)
  logits = np.asarray(logits)[np.arange(batch)[:, None], index]
  return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def _score(log_probs, tokens, eos_id):
  """Sum of log-probs [B] of `tokens` up to the first EOS included."""
  picked = np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  return np.sum(picked * _before_end(tokens, eos_id), axis=-1)


def _before_end(tokens, eos_id):
  """1 for tokens up to the first EOS included, 0 after it."""
  is_eos = (tokens == eos_id).astype(np.int32)
  return (np.cumsum(is_eos, axis=-1) - is_eos) == 0


def _uncached_greedy(model, prompt, steps):
  """Re-runs the whole [image, prompt, generated so far] for every token."""
  generated = np.zeros((len(PROMPT_LENS), steps), np.int32)
  for t in range(steps):
    log_probs = _log_probs(model, prompt, PROMPT_LENS, generated)
    generated[:, t] = np.argmax(log_probs[:, t], axis=-1)
  return generated


def test_greedy_decode_equals_uncached_argmax(model, prompt):
  out = decode.generate(model, prompt, max_new_tokens=NEW, eos_id=NEVER)
  tokens = out.tokens
  assert tokens.shape == (len(PROMPT_LENS), NEW) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, _uncached_greedy(model, prompt, NEW))
  # Meaningful only if each example's tokens change along the way.
  assert all(len(np.unique(row)) > 1 for row in np.asarray(tokens))
  log_probs = _log_probs(model, prompt, PROMPT_LENS, tokens)
  np.testing.assert_allclose(out.scores, _score(log_probs, tokens, NEVER),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      decode.greedy_decode(model, prompt, max_new_tokens=NEW, eos_id=NEVER),
      tokens)


def test_unrolled_layers_decode_as_scanned_ones(model, prompt):
  config = dataclasses.replace(model.config, scan_layers=False)
  unrolled = nnx.merge(nnx.graphdef(VLM(config, rngs=nnx.Rngs(0))),
                       nnx.state(model))
  np.testing.assert_array_equal(
      decode.greedy_decode(unrolled, prompt, max_new_tokens=NEW,
                           eos_id=NEVER),
      decode.greedy_decode(model, prompt, max_new_tokens=NEW, eos_id=NEVER))


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
  decode._decode.clear_cache()
  first = decode.greedy_decode(model, prompt, max_new_tokens=NEW,
                               eos_id=NEVER)
  other = dict(prompt, text=(prompt["text"] + 1) * prompt["mask_input"])
  decode.greedy_decode(model, other, max_new_tokens=NEW, eos_id=NEVER)
  assert decode._decode._cache_size() == 1
  for seed in range(2):   # A new key is an argument, not a new program.
    decode.generate(model, prompt, max_new_tokens=NEW, strategy="sample",
                    rng=jax.random.key(seed))
  assert decode._decode._cache_size() == 2

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
  experts = [dict(kind="smola", targets=r"decoder/.*/(attn/q|mlp/up)",
                  pools=dict(text=3, image=3, all=2), rank=2)]
  config = presets.get_preset("tiny", decoder_depth=2)
  model = _sharpened(VLM(config, plan=build.expert_plan(experts, config),
                         rngs=nnx.Rngs(0)))
  tokens = decode.greedy_decode(model, prompt, max_new_tokens=NEW,
                                eos_id=NEVER)
  np.testing.assert_array_equal(tokens, _uncached_greedy(model, prompt, NEW))


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_with_one_candidate_is_greedy(model, prompt, options):
  greedy = decode.generate(model, prompt, max_new_tokens=NEW, eos_id=NEVER)
  sampled = decode.generate(model, prompt, max_new_tokens=NEW, eos_id=NEVER,
                            strategy="sample", temperature=3.0,
                            rng=jax.random.key(0), **options)
  np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
  np.testing.assert_allclose(sampled.scores, greedy.scores, rtol=1e-6)


def test_top_k_samples_lie_in_uncached_top_k(model, prompt):
  top_k = 3
  out = decode.generate(model, prompt, max_new_tokens=NEW, eos_id=NEVER,
                        strategy="sample", temperature=4.0, top_k=top_k,
                        rng=jax.random.key(0))
  log_probs = _log_probs(model, prompt, PROMPT_LENS, out.tokens)
  picked = np.take_along_axis(log_probs, np.asarray(out.tokens)[..., None],
                              axis=-1)
  rank = np.sum(log_probs > picked, axis=-1)
  assert (rank < top_k).all()
  assert (rank > 0).any()   # Not just the argmax.
  np.testing.assert_allclose(out.scores, _score(log_probs, out.tokens, NEVER),
                             rtol=1e-5, atol=1e-5)


def test_sampling_is_deterministic_per_key(model, prompt):
  sample = lambda seed: np.asarray(decode.generate(
      model, prompt, max_new_tokens=NEW, strategy="sample",
      rng=jax.random.key(seed)).tokens)
  np.testing.assert_array_equal(sample(0), sample(0))
  assert (sample(0) != sample(1)).any()


def test_first_token_frequencies_follow_temperature(model, prompt):
  """Draws the first token of example 0 many times, in one batch.

  Each count is binomial; 5 standard deviations (plus a little slack for
  rare tokens) fails by chance with probability < 1e-4 over the vocabulary,
  and not at all at this fixed key. The same check rejects the
  distributions of neighbouring temperatures, so a wrong one is caught.
  """
  draws, temperature = 4096, 2.0
  batch = jax.tree.map(lambda x: jnp.repeat(x[:1], draws, axis=0), prompt)
  out = decode.generate(model, batch, max_new_tokens=1, strategy="sample",
                        temperature=temperature, rng=jax.random.key(0))
  vocab = model.config.decoder.vocab_size
  freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=vocab) / draws
  log_probs = _log_probs(model, prompt, PROMPT_LENS,
                         np.zeros((len(PROMPT_LENS), 1), np.int32))[0, 0]

  def matches(t):
    p = np.asarray(jax.nn.softmax(log_probs / t))
    tolerance = 5 * np.sqrt(p * (1 - p) / draws) + 2 / draws
    return np.all(np.abs(freq - p) <= tolerance)

  assert matches(temperature)
  assert not matches(1.0) and not matches(1.5) and not matches(2.5)


def test_filter_logits_top_p_keeps_smallest_set_reaching_p():
  probs = np.array([0.1, 0.5, 0.05, 0.35])   # Sorted: 1, 3, 0, 2.
  logits = jnp.log(jnp.asarray([probs, probs[::-1]]))

  def kept(**options):
    filtered = decode.filter_logits(logits, decode.Sampling(**options))
    return [set(np.flatnonzero(row > -np.inf)) for row in filtered]

  assert kept(top_p=0.3) == [{1}, {2}]
  assert kept(top_p=0.84) == [{1, 3}, {2, 0}]
  assert kept(top_p=0.86) == [{1, 3, 0}, {2, 0, 3}]
  assert kept(top_p=1.0) == [{0, 1, 2, 3}] * 2
  assert kept(top_k=3, top_p=0.9) == [{1, 3, 0}, {2, 0, 3}]
  # Temperature first: at 10 the top two hold less than 0.6.
  assert kept(temperature=10.0, top_p=0.6) == [{1, 3, 0}, {2, 0, 3}]


def test_beam_size_1_is_greedy(model, prompt):
  greedy = decode.generate(model, prompt, max_new_tokens=NEW, eos_id=NEVER)
  beam = decode.generate(model, prompt, max_new_tokens=NEW, eos_id=NEVER,
                         strategy="beam", beam_size=1)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)


def _enumerated_best(model, prompt, eos_id, length_penalty):
  """The best hypothesis among all SMALL_VOCAB**SMALL_NEW continuations.

  A continuation ends at its first EOS (PAD after it) and is ranked by
  sum of log-probs / length**length_penalty, as `generate` documents.

  Returns:
    (tokens [B, SMALL_NEW], scores [B]).
  """
  every = np.array(list(itertools.product(range(SMALL_VOCAB),
                                          repeat=SMALL_NEW)), np.int32)
  tokens, scores = [], []
  for b, p in enumerate(SMALL_LENS):
    one = jax.tree.map(lambda x: jnp.repeat(x[b:b + 1], len(every), axis=0),
                       prompt)
    log_probs = _log_probs(model, one, [p] * len(every), every)
    score = _score(log_probs, every, eos_id)
    length = np.sum(_before_end(every, eos_id), axis=-1)
    best = np.argmax(score / length**length_penalty)
    tokens.append(np.where(_before_end(every[best], eos_id), every[best],
                           decode.PAD_ID))
    scores.append(score[best])
  return np.array(tokens), np.array(scores)


def _wide_beam(model, prompt, eos_id, length_penalty):
  """Beam search with beam_size = V**(n-1): it keeps every prefix."""
  return decode.generate(model, prompt, max_new_tokens=SMALL_NEW,
                         eos_id=eos_id, strategy="beam",
                         beam_size=SMALL_VOCAB**(SMALL_NEW - 1),
                         length_penalty=length_penalty)


@pytest.mark.parametrize("eos_id", [NEVER, SMALL_EOS])
def test_wide_beam_finds_the_most_likely_hypothesis(small_model, small_prompt,
                                                    eos_id):
  """With EOS, the finished pool must keep every hypothesis that ended."""
  out = _wide_beam(small_model, small_prompt, eos_id, 0.0)
  tokens, scores = _enumerated_best(small_model, small_prompt, eos_id, 0.0)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_allclose(out.scores, scores, rtol=1e-5, atol=1e-5)
  greedy = decode.greedy_decode(small_model, small_prompt,
                                max_new_tokens=SMALL_NEW, eos_id=eos_id)
  assert (greedy != tokens).any()   # Not a problem greedy solves.


def test_wide_beam_ranks_by_length_penalty(small_model, small_prompt):
  out = _wide_beam(small_model, small_prompt, SMALL_EOS, 1.0)
  tokens, scores = _enumerated_best(small_model, small_prompt, SMALL_EOS, 1.0)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_allclose(out.scores, scores, rtol=1e-5, atol=1e-5)
  plain = _wide_beam(small_model, small_prompt, SMALL_EOS, 0.0)
  assert (plain.tokens != tokens).any()   # The penalty changes the winner.


def test_beam_keeps_finished_hypotheses(small_model, small_prompt):
  """An EOS hypothesis outranked by an alive beam still wins in the end.

  With beam_size 1 and plain sums, the one alive beam follows greedy until
  greedy emits EOS, so beam search ends at least as well as greedy; here a
  hypothesis that ended while greedy went on ends better.
  """
  greedy = decode.generate(small_model, small_prompt,
                           max_new_tokens=SMALL_NEW, eos_id=SMALL_EOS)
  beam = decode.generate(small_model, small_prompt, max_new_tokens=SMALL_NEW,
                         eos_id=SMALL_EOS, strategy="beam", beam_size=1)
  assert (np.asarray(beam.scores) >= np.asarray(greedy.scores) - 1e-5).all()
  better = np.asarray(beam.scores) > np.asarray(greedy.scores) + 1e-3
  assert better.any()
  for row in np.asarray(beam.tokens)[better]:
    end = np.flatnonzero(row == SMALL_EOS)[0]
    np.testing.assert_array_equal(row[end + 1:], decode.PAD_ID)
  log_probs = _log_probs(small_model, small_prompt, SMALL_LENS, beam.tokens)
  np.testing.assert_allclose(beam.scores,
                             _score(log_probs, beam.tokens, SMALL_EOS),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,message", [
    (dict(strategy="topk"), "strategy"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(strategy="sample", temperature=0.0, rng=jax.random.key(0)),
     "temperature"),
    (dict(strategy="sample", top_k=-1, rng=jax.random.key(0)), "top_k"),
    (dict(strategy="sample", top_p=0.0, rng=jax.random.key(0)), "top_p"),
    (dict(strategy="sample", top_p=1.5, rng=jax.random.key(0)), "top_p"),
    (dict(strategy="sample"), "rng"),
    (dict(strategy="beam", beam_size=0), "beam_size"),
])
def test_bad_arguments_raise(model, prompt, options, message):
  options = dict(dict(max_new_tokens=NEW), **options)
  with pytest.raises(ValueError, match=message):
    decode.generate(model, prompt, **options)
