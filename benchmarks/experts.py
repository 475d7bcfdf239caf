r"""Sparse MoE dispatch: dropless forms against the one-hot capacity einsum.

All three run the same SparseMoE (same parameters, top-k routing, GeGLU
experts) and differ only in how token copies reach their experts:

  capacity: V-MoE/GShard one-hot dispatch/combine einsums, per sequence,
            `--capacity_factor` slots (overflow dropped)
  blocked:  dropless; sort by expert, pad groups to tiles, one batched einsum
            over tiles with gathered expert weights (the CPU default)
  ragged:   dropless; sort by expert, jax.lax.ragged_dot (the GPU/TPU default)

Reports forward and forward+backward time (median of --repeats after a
warm-up) and the temporary memory of the compiled executable (XLA's memory
analysis), with the machine it ran on. Runs unchanged on CPU, GPU or TPU:

  python -m benchmarks.experts --experts=64 --top_k=2 --tokens=2048
"""
import argparse
import datetime
import os
import platform
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.smola import measure
from omnismola.experts.sparse import SparseMoE
from omnismola.models import layers
from omnismola.models.layers import TokenInfo
# pylint: enable=g-import-not-at-top,wrong-import-position

DISPATCHES = ("capacity", "blocked", "ragged")


def machine() -> str:
  """CPU model, core count, accelerator and JAX version, on one line."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f
                 if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (f"{cpu}, {os.cpu_count()} cores; {jax.devices()[0].device_kind} "
          f"x{jax.device_count()} ({jax.default_backend()}); jax "
          f"{jax.__version__}; {datetime.date.today()}")


def run(args) -> list[dict]:
  """One row per (dispatch, pass): seconds, temporary bytes and the forward
  loss (sum of squared outputs plus the routers' losses)."""
  batch = args.tokens // args.length
  x = jax.random.normal(jax.random.key(1), (batch, args.length, args.width))
  tokens = TokenInfo.image(batch, args.length)
  params = None
  fns = {}
  for kind in DISPATCHES:
    moe = SparseMoE(args.width, args.mlp_dim, num_experts=args.experts,
                    top_k=args.top_k, capacity_factor=args.capacity_factor,
                    dispatch=kind, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(moe)
    params = nnx.to_pure_dict(state) if params is None else params

    def loss(p, x, graphdef=graphdef, state=state):
      filled = jax.tree.map(lambda v: v, state)
      nnx.replace_by_pure_dict(filled, p)
      moe = nnx.merge(graphdef, filled)
      y = moe(x, tokens)
      aux = layers.pop_reports(moe)[""]["routing"]
      return jnp.sum(y**2) + aux.balance_loss + aux.z_loss

    fns[kind, "forward"] = loss
    fns[kind, "fwd+bwd"] = jax.grad(loss, argnums=(0, 1))
  results = measure(fns, (params, x), args.repeats)
  # The forward value beside each time: dropless forms must agree exactly
  # enough that a faster one is not a wrong one.
  return [dict(dispatch=kind, passes=name, **result,
               loss=float(fns[kind, "forward"](params, x)))
          for (kind, name), result in results.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--mlp_dim", type=int, default=512)
  parser.add_argument("--tokens", type=int, default=2048,
                      help="tokens per batch, in sequences of --length")
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--capacity_factor", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  rows = run(args)
  print(f"machine: {machine()}")
  print("config: " + ", ".join(f"{k}={v}" for k, v in vars(args).items()))
  print(f"{'dispatch':<10}{'pass':<9}{'ms':>12}{'temp MiB':>12}"
        f"{'loss':>14}")
  for row in rows:
    temp = row["temp_bytes"]
    temp = "n/a" if temp is None else f"{temp / 2**20:.1f}"
    print(f"{row['dispatch']:<10}{row['passes']:<9}"
          f"{row['seconds'] * 1e3:>12.1f}{temp:>12}{row['loss']:>14.6g}")


if __name__ == "__main__":
  main()
