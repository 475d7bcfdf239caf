r"""Fused SMoLA against a naive form that materialises [tokens, experts, d_out].

Both compute the per-token soft mixture of low-rank experts (the path every
causal token takes, and the bulk of SMoLA's cost):

  naive:  Y[t, j] = x_t A_j B_j for every expert j, then y_t = sum_j w_tj Y[t, j]
  fused:  h = x A_cat ([T, n*r]), scale each rank block by w_tj, y = h B_cat

Reports forward+backward time (median of --repeats after a warm-up) and the
temporary memory XLA's compiled executable reserves (its memory analysis).
Runs without TensorFlow, on CPU, GPU or TPU alike:

  python benchmarks/smola.py --experts=64 --rank=4 --width=1024 --tokens=4096
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.experts.smola import SMoLAPool
from omnismola.models.layers import TokenInfo


def naive_pool(x, tokens, a, b, phi, scale):
  """Per-token mixture with every expert's full output materialised."""
  from omnismola.experts import routing  # pylint: disable=g-import-not-at-top
  logits = routing.cosine_logits(x, phi, scale)
  weights = jnp.sum(jax.nn.softmax(logits, axis=(-2, -1)), axis=-1)
  weights = weights * tokens.valid[..., None]
  expert_out = jnp.einsum("btd,dnr,nro->btno", x, a, b)  # [B, T, n, d_out]
  return jnp.einsum("btn,btno->bto", weights, expert_out)


def measure(fn, args, repeats: int) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", None) if memory else None
  return dict(seconds=sorted(times)[len(times) // 2],
              temp_bytes=int(temp) if temp is not None else None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  pool = SMoLAPool(args.width, args.width, modality="all",
                   num_experts=args.experts, rank=args.rank,
                   rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(pool)
  params = nnx.to_pure_dict(state)
  params["b"] = jax.random.normal(jax.random.key(1), params["b"].shape) * 0.02
  x = jax.random.normal(jax.random.key(2), (1, args.tokens, args.width))
  # Every token causal: the per-token path, as in the decoder's suffix.
  tokens = TokenInfo.text(valid=jnp.ones((1, args.tokens), bool),
                          bidirectional=jnp.zeros((1, args.tokens), bool))

  def fused_loss(p, x):
    filled = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(filled, p)
    return jnp.sum(nnx.merge(graphdef, filled)(x, tokens) ** 2)

  def naive_loss(p, x):
    return jnp.sum(naive_pool(x, tokens, p["a"], p["b"], p["phi"],
                              p["scale"]) ** 2)

  grad = lambda loss: jax.grad(loss, argnums=(0, 1))
  results = {name: measure(grad(loss), (params, x), args.repeats)
             for name, loss in (("fused", fused_loss), ("naive", naive_loss))}
  results["speedup"] = results["naive"]["seconds"] / results["fused"]["seconds"]
  results["config"] = vars(args)
  results["device"] = f"{jax.devices()[0].device_kind} ({platform.node()})"
  results["jax"] = jax.__version__
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
