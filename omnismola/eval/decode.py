"""Greedy decoding with a KV cache: prefill image + prompt, then a token a step.

`greedy_decode` splits the model into its static graph and its arrays and
runs one jitted function, so it compiles once per (model structure, batch
shape, max_new_tokens) and may itself be called inside a jitted function
(the trainer rebuilds the model from arrays there).
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

PROMPT_KEYS = ("image", "text", "mask_ar", "mask_input")
PAD_ID = 0


def greedy_decode(model: nnx.Module, batch: dict, *, max_new_tokens: int,
                  eos_id: int = 1) -> jax.Array:
  """Generates up to `max_new_tokens` tokens after each example's prompt.

  Args:
    model: a `VLM` (anything with `num_image_tokens`, `prefill`, `extend`).
    batch: the prompt: image [B, H, W, 3], text / mask_ar / mask_input
      int32 [B, L], prompts padded at the end; other keys are ignored.
    max_new_tokens: how many tokens to generate.
    eos_id: generation of an example ends after this token.

  Returns:
    int32 [B, max_new_tokens]: the generated tokens, EOS included, PAD_ID
    after it. The loop stops as soon as every example has ended.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  graphdef, state = nnx.split(model)
  prompt = {k: batch[k] for k in PROMPT_KEYS}
  return _greedy_decode(graphdef, state, prompt,
                        max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "max_new_tokens", "eos_id"))
def _greedy_decode(graphdef, state, prompt, *, max_new_tokens: int,
                   eos_id: int) -> jax.Array:
  model = nnx.merge(graphdef, state)
  batch, length = prompt["text"].shape
  cache_length = model.num_image_tokens + length + max_new_tokens
  logits, cache = model.prefill(**prompt, cache_length=cache_length)

  def emit(step, logits, out, done):
    """Writes the argmax at column `step`; PAD_ID once an example ended."""
    token = jnp.where(done, PAD_ID, jnp.argmax(logits, axis=-1))
    token = token.astype(jnp.int32)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    return token, out, done | (token == eos_id)

  out = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)
  token, out, done = emit(0, logits, out, jnp.zeros((batch,), bool))

  def running(carry):
    step, _, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def step_fn(carry):
    step, token, out, done, cache = carry
    logits, cache = model.extend(token, cache)
    token, out, done = emit(step, logits, out, done)
    return step + 1, token, out, done, cache

  carry = (jnp.asarray(1, jnp.int32), token, out, done, cache)
  return jax.lax.while_loop(running, step_fn, carry)[2]
