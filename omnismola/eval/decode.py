"""Decoding with a KV cache: greedy, sampling and beam search.

Every strategy prefills image + prompt once, then extends the cache one token
a step inside a `jax.lax.while_loop` that ends as soon as nothing can change
any more. `generate` splits the model into its static graph and its arrays
and runs one jitted function, so it compiles once per (model structure,
batch shape, static options) and may itself be called inside a jitted
function (the trainer rebuilds the model from arrays there).

Greedy decoding and sampling share one loop (`_decode`); they differ only in
how a token is picked from the logits. Beam search (`_beam_search`) carries
`beam_size` hypotheses per example, reorders the cache every step and keeps
a pool of finished hypotheses, so it has its own loop.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

PROMPT_KEYS = ("image", "text", "mask_ar", "mask_input")
PAD_ID = 0
STRATEGIES = ("greedy", "sample", "beam")


class Generation(NamedTuple):
  """What `generate` returns.

  Attributes:
    tokens: int32 [B, max_new_tokens], EOS included, PAD_ID after it.
    scores: float32 [B], the sum of the model's log-probs (temperature 1, no
      top-k / top-p) of `tokens` up to EOS included, or of all of them if
      there is no EOS. Beam search ranks hypotheses by a length-normalised
      score (see `generate`) but returns this raw sum.
  """
  tokens: jax.Array
  scores: jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How `sample` reshapes the logits before drawing (a static jit option)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


def generate(model: nnx.Module, batch: dict, *, max_new_tokens: int,
             eos_id: int = 1, strategy: str = "greedy",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             beam_size: int = 4, length_penalty: float = 0.0,
             rng: jax.Array | None = None) -> Generation:
  """Generates up to `max_new_tokens` tokens after each example's prompt.

  `model` is a `VLM` (anything with `num_image_tokens`, `prefill`,
  `extend`); `batch` the prompt: image [B, H, W, 3], text / mask_ar /
  mask_input int32 [B, L], prompts padded at the end (other keys ignored).
  "sample" uses `temperature` (> 0), `top_k` (0 keeps all), `top_p` (in
  (0, 1], 1 keeps all; the most likely token always stays) and `rng` (the
  same key gives the same tokens); "beam" uses `beam_size` and
  `length_penalty`: finished hypotheses rank by sum of log-probs /
  length**length_penalty, length counting EOS (docs/models.md).
  """
  _check_args(max_new_tokens=max_new_tokens, strategy=strategy,
              temperature=temperature, top_k=top_k, top_p=top_p,
              beam_size=beam_size, rng=rng)
  graphdef, state = nnx.split(model)
  prompt = {k: batch[k] for k in PROMPT_KEYS}
  if strategy == "beam":
    return _beam_search(graphdef, state, prompt,
                        max_new_tokens=max_new_tokens, eos_id=eos_id,
                        beam_size=beam_size, length_penalty=length_penalty)
  sampling = None
  if strategy == "sample":
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  else:
    rng = None   # Greedy ignores it, so a key never triggers a recompile.
  return _decode(graphdef, state, prompt, rng, max_new_tokens=max_new_tokens,
                 eos_id=eos_id, sampling=sampling)


def greedy_decode(model: nnx.Module, batch: dict, *, max_new_tokens: int,
                  eos_id: int = 1) -> jax.Array:
  """The tokens of `generate(..., strategy="greedy")`."""
  return generate(model, batch, max_new_tokens=max_new_tokens,
                  eos_id=eos_id).tokens


def _check_args(*, max_new_tokens, strategy, temperature, top_k, top_p,
                beam_size, rng):
  """Fails early and readably rather than deep inside tracing."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got "
                     f"{strategy!r}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature} (use "
                     "strategy='greedy' for the argmax).")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 keeps all), got "
                     f"{top_k!r}.")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}.")
  if strategy == "sample" and rng is None:
    raise ValueError("strategy='sample' needs a PRNG key: rng=...")


def _prefill(model, prompt, max_new_tokens):
  """Logits and cache of the prompts, with room for the new tokens."""
  cache_length = (model.num_image_tokens + prompt["text"].shape[1] +
                  max_new_tokens)
  return model.prefill(**prompt, cache_length=cache_length)


def _log_prob(logits, token):
  """log softmax(logits)[token], float32 [B]."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Logits / temperature, -inf outside the top-k and then the top-p set."""
  logits = logits / sampling.temperature
  if 0 < sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    logits = _nucleus(logits, sampling.top_p)
  return logits


def _nucleus(logits, top_p):
  """-inf outside the smallest most likely set whose probability >= top_p.

  Token i (by decreasing probability) is kept iff the tokens before it hold
  less than top_p, so the first is always kept. Ties with the least likely
  kept token are kept too.
  """
  ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "eos_id", "sampling"))
def _decode(graphdef, state, prompt, rng, *, max_new_tokens: int,
            eos_id: int, sampling: Sampling | None) -> Generation:
  """Greedy (sampling None) or sampled decoding, one token per example."""
  model = nnx.merge(graphdef, state)
  batch = prompt["text"].shape[0]
  logits, cache = _prefill(model, prompt, max_new_tokens)

  def emit(step, logits, out, scores, done):
    """Picks column `step`'s tokens (the argmax, or a draw from the filtered
    logits); PAD_ID once an example ended."""
    if sampling is None:
      picked = jnp.argmax(logits, axis=-1)
    else:
      picked = jax.random.categorical(jax.random.fold_in(rng, step),
                                      filter_logits(logits, sampling))
    token = jnp.where(done, PAD_ID, picked.astype(jnp.int32))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    scores += jnp.where(done, 0.0, _log_prob(logits, token))
    return token, out, scores, done | (token == eos_id)

  out = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)
  token, out, scores, done = emit(0, logits, out, jnp.zeros((batch,)),
                                  jnp.zeros((batch,), bool))

  def running(carry):
    step, _, _, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def step_fn(carry):
    step, token, out, scores, done, cache = carry
    logits, cache = model.extend(token, cache)
    token, out, scores, done = emit(step, logits, out, scores, done)
    return step + 1, token, out, scores, done, cache

  carry = (jnp.asarray(1, jnp.int32), token, out, scores, done, cache)
  _, _, out, scores, _, _ = jax.lax.while_loop(running, step_fn, carry)
  return Generation(out, scores)


class _Beams(NamedTuple):
  """Hypotheses [B, K]: tokens so far, sum of log-probs, sort key."""
  tokens: jax.Array   # int32 [B, K, max_new_tokens], PAD_ID where unwritten.
  scores: jax.Array   # float32 [B, K]; -inf for an empty slot.
  ranks: jax.Array    # float32 [B, K]; what the best beams are chosen by.


def _best(beams: _Beams, k: int) -> _Beams:
  """The k beams of highest rank per example."""
  ranks, index = jax.lax.top_k(beams.ranks, k)
  tokens = jnp.take_along_axis(beams.tokens, index[..., None], axis=1)
  return _Beams(tokens, jnp.take_along_axis(beams.scores, index, axis=1),
                ranks)


def _concat(a: _Beams, b: _Beams) -> _Beams:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), a, b)


def _normalised(scores, length, length_penalty):
  """The rank of hypotheses of `length` tokens: scores / length**penalty."""
  return scores / jnp.asarray(length, jnp.float32) ** length_penalty


def _beam_step(step, logits, alive, finished, *, eos_id, length_penalty):
  """Extends the alive beams by column `step`.

  Continuations ending with EOS join the finished pool (the best K of pool
  and newcomers by normalised score) and are never extended again; the best
  K other continuations by plain sum of log-probs stay alive. Returns
  (parent [B, K]: the alive beam each new alive beam extends, token int32
  [B, K]: its new token, alive, finished).
  """
  batch, size, _ = alive.tokens.shape
  log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, size, -1)
  vocab = log_probs.shape[-1]
  scores = alive.scores[..., None] + log_probs
  is_eos = jnp.arange(vocab) == eos_id
  ended = jnp.max(jnp.where(is_eos, scores, -jnp.inf), axis=-1)
  finished = _best(_concat(finished, _Beams(
      alive.tokens.at[:, :, step].set(eos_id), ended,
      _normalised(ended, step + 1, length_penalty))), size)
  top_scores, top = jax.lax.top_k(
      jnp.where(is_eos, -jnp.inf, scores).reshape(batch, size * vocab), size)
  parent, token = top // vocab, (top % vocab).astype(jnp.int32)
  tokens = jnp.take_along_axis(alive.tokens, parent[..., None], axis=1)
  alive = _Beams(tokens.at[:, :, step].set(token), top_scores, top_scores)
  return parent, token, alive, finished


def _can_improve(step, alive, finished, *, max_new_tokens, length_penalty):
  """Whether an alive beam may still beat the worst finished one.

  `step` tokens are written. Adding tokens only lowers a beam's sum, and
  sum / length**penalty is monotone in length, so the best an alive beam
  can end with is its sum normalised at length step + 1 or max_new_tokens.
  """
  best = jnp.max(alive.scores, axis=1)
  bound = jnp.maximum(_normalised(best, step + 1, length_penalty),
                      _normalised(best, max_new_tokens, length_penalty))
  return jnp.any(bound > jnp.min(finished.ranks, axis=1))


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "eos_id", "beam_size", "length_penalty"))
def _beam_search(graphdef, state, prompt, *, max_new_tokens: int,
                 eos_id: int, beam_size: int,
                 length_penalty: float) -> Generation:
  """Beam search over a cache of B * beam_size rows, example-major."""
  model = nnx.merge(graphdef, state)
  batch = prompt["text"].shape[0]
  logits, cache = _prefill(model, prompt, max_new_tokens)
  rows = jnp.repeat(jnp.arange(batch), beam_size)
  cache, logits = cache.take(rows), logits[rows]
  shape = (batch, beam_size, max_new_tokens)
  # All beams start as copies of the prompt; only the first one counts, so
  # the first step picks beam_size distinct tokens.
  first = jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf)
  first = jnp.broadcast_to(first, (batch, beam_size))
  alive = _Beams(jnp.full(shape, PAD_ID, jnp.int32), first, first)
  empty = jnp.full((batch, beam_size), -jnp.inf)
  finished = _Beams(jnp.full(shape, PAD_ID, jnp.int32), empty, empty)
  offsets = jnp.arange(batch)[:, None] * beam_size
  step = functools.partial(_beam_step, eos_id=eos_id,
                           length_penalty=length_penalty)
  can_improve = functools.partial(_can_improve, max_new_tokens=max_new_tokens,
                                  length_penalty=length_penalty)

  def running(carry):
    i, _, _, alive, finished, _ = carry
    return (i < max_new_tokens) & can_improve(i, alive, finished)

  def step_fn(carry):
    i, parent, token, alive, finished, cache = carry
    cache = cache.take((offsets + parent).reshape(-1))
    logits, cache = model.extend(token.reshape(-1), cache)
    parent, token, alive, finished = step(i, logits, alive, finished)
    return i + 1, parent, token, alive, finished, cache

  parent, token, alive, finished = step(0, logits, alive, finished)
  carry = (jnp.asarray(1, jnp.int32), parent, token, alive, finished, cache)
  i, _, _, alive, finished, _ = jax.lax.while_loop(running, step_fn, carry)
  # Beams still alive at max_new_tokens are hypotheses too. If the loop
  # stopped early, none of them can win (`_can_improve`).
  truncated = jnp.where(
      i == max_new_tokens,
      _normalised(alive.scores, max_new_tokens, length_penalty), -jnp.inf)
  best = _best(_concat(finished, alive._replace(ranks=truncated)), 1)
  return Generation(best.tokens[:, 0], best.scores[:, 0])
