r"""Fused SMoLA against a naive form that materialises [tokens, experts, d_out].

Both compute one SMoLA pool (`experts/smola.py`) on one sequence:

  naive:  per-token path Y[t, j] = x_t A_j B_j for every expert j, then
          y_t = sum_j w_tj Y[t, j]; Soft MoE (slot) path, where tokens are
          bidirectional, in its textbook form: slots from tokens in d_in,
          experts on slots, each token's combine over slot outputs in d_out
  fused:  `experts/smola.py`: h = x [A_cat | router], both paths mixed in
          rank space, y = h B_cat

By default every token is causal (the decoder's suffix), so only the
per-token path carries weight; `--bidirectional=0.5` makes the first half of
the sequence bidirectional image tokens, so the slot path is measured too.
Reports forward+backward time (median of --repeats after a warm-up), the
temporary memory XLA's compiled executable reserves (its memory analysis),
the largest difference between the two outputs, and the load average it ran
under.
Runs without TensorFlow, on CPU, GPU or TPU alike:

  python benchmarks/smola.py --experts=64 --rank=4 --width=1024 --tokens=4096
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.experts import routing
from omnismola.experts.smola import SMoLAPool
from omnismola.models.layers import TokenInfo


def naive_pool(x, tokens, a, b, phi, scale, multiplier, slots: bool):
  """An "all" pool with every expert's and slot's output in d_out space.

  Without `slots` the Soft MoE path is left out (right when no token is
  bidirectional): the cheapest naive form for all-causal sequences, whereas
  the fused form, which cannot know, still runs its slot path.
  """
  logits = routing.cosine_logits(x, phi, scale)
  combine = jax.nn.softmax(logits, axis=(-2, -1))
  grouped = tokens.valid & tokens.bidirectional
  causal = tokens.valid & ~tokens.bidirectional
  weights = jnp.sum(combine, axis=-1) * causal[..., None]
  expert_out = jnp.einsum("btd,dnr,nro->btno", x, a, b)  # [B, T, n, d_out]
  y = jnp.einsum("btn,btno->bto", weights, expert_out)
  if not slots:
    return multiplier * y
  dispatch = routing.masked_softmax(logits, grouped[:, :, None, None], axis=1)
  slots_out = jnp.einsum("btnp,btd,dnr,nro->bnpo", dispatch, x, a, b)
  y_grouped = jnp.einsum("btnp,bnpo->bto", combine * grouped[..., None, None],
                         slots_out)
  return multiplier * (y + y_grouped)


def measure(fns: dict, args, repeats: int) -> dict:
  """{name: median seconds of `repeats` calls after a warm-up call, XLA's
  temporary bytes} for each jitted fn on `args`.

  Each fn's calls run back to back, as a training step repeats. Alternating
  fns would charge one for the cache and memory state another leaves: the
  fused SMoLA step right after the naive one (3 GB of temporaries) measured
  0.23-0.26 s against 0.147 s back to back.
  """
  results = {}
  for name, fn in fns.items():
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory else None
    results[name] = dict(seconds=sorted(times)[repeats // 2],
                         temp_bytes=int(temp) if temp is not None else None)
  return results


def sequence(tokens: int, bidirectional: float) -> TokenInfo:
  """One sequence: bidirectional image tokens first, then causal text."""
  grouped = round(tokens * bidirectional)
  return TokenInfo.concat([
      TokenInfo.image(1, grouped),
      TokenInfo.text(valid=jnp.ones((1, tokens - grouped), bool),
                     bidirectional=jnp.zeros((1, tokens - grouped), bool))])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--bidirectional", type=float, default=0.0,
                      help="share of the tokens that are bidirectional")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  pool = SMoLAPool(args.width, args.width, modality="all",
                   num_experts=args.experts, rank=args.rank,
                   rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(pool)
  params = nnx.to_pure_dict(state)
  params["b"] = jax.random.normal(jax.random.key(1), params["b"].shape) * 0.02
  x = jax.random.normal(jax.random.key(2), (1, args.tokens, args.width))
  tokens = sequence(args.tokens, args.bidirectional)

  def fused(p, x):
    filled = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(filled, p)
    return nnx.merge(graphdef, filled)(x, tokens)

  def naive(p, x):
    return naive_pool(x, tokens, p["a"], p["b"], p["phi"], p["scale"],
                      pool.multiplier, slots=args.bidirectional > 0)

  def grad(form):
    return jax.grad(lambda p, x: jnp.sum(form(p, x)**2), argnums=(0, 1))

  load_before = os.getloadavg()[0]
  results = measure(dict(fused=grad(fused), naive=grad(naive)), (params, x),
                    args.repeats)
  results["speedup"] = results["naive"]["seconds"] / results["fused"]["seconds"]
  results["max_abs_difference"] = float(jnp.max(jnp.abs(
      jax.jit(fused)(params, x) - jax.jit(naive)(params, x))))
  results["load_average_1min"] = [load_before, os.getloadavg()[0]]
  results["config"] = vars(args)
  results["device"] = f"{jax.devices()[0].device_kind} ({platform.node()})"
  results["jax"] = jax.__version__
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
