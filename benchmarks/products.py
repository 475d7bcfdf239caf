r"""A lower bound on the LoRA step at the peer's shape: its products, alone.

Times, each jitted on its own, the products a frozen-backbone LoRA step at
benchmarks/peer.py's shape runs (the decoder's GeGLU MLP forward and input
gradient, its attention projections and scores, the ViT's forward pass, the
LoRA adapters; not the small logits), and adds them up with each one's
count per step. Nothing around them is timed (no scan, norms, loss or
optimizer), so the sum is what the step would take if XLA ran every
product at its standalone rate and everything else were free. Compared
with the peer's step time, it says which ratio to the peer is reachable at
all on this machine.

  python -m benchmarks.products                 # the peer's `cpu` shape
  python -m benchmarks.products --shape=tiny --repeats=1
"""
import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import peer


def seconds(fn, *args, repeats: int) -> float:
  """Best of 3 means over `repeats` calls of jitted `fn`."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / repeats)
  return best


def attention(q, k):
  """Multi-query scores, softmax and weighted sum (k doubles as v)."""
  probs = jax.nn.softmax(jnp.einsum("bthd,bsd->bhts", q, k), axis=-1)
  return jnp.einsum("bhts,bsd->bthd", probs, k)


def geglu(x, gate, up, down):
  return (jax.nn.gelu(x @ gate) * (x @ up)) @ down


def products(shape: dict, batch: int, text_len: int) -> list[tuple]:
  """(name, fn, args, FLOPs of one call, calls per step) of the step."""
  vit, dec = shape["vit"], shape["decoder"]
  image_tokens = (vit["image_size"] // vit["patch_size"]) ** 2
  tokens, patches = batch * (image_tokens + text_len), batch * image_tokens
  width, mlp = dec["width"], dec["mlp_dim"]
  heads, head_dim = dec["num_heads"], dec["head_dim"]
  qo = heads * head_dim
  projections = 2 * qo + 2 * dec["num_kv_heads"] * head_dim  # q, o, k, v
  normal = lambda *s: jax.random.normal(jax.random.PRNGKey(len(s)), s)
  x, wide = normal(tokens, width), normal(width, mlp)
  mlp_weights = (wide, wide + 1, normal(mlp, width))
  seq = image_tokens + text_len
  q, k = normal(batch, seq, heads, head_dim), normal(batch, seq, head_dim)
  att_flops = 4 * batch * seq * seq * heads * head_dim
  v_x, v_wide = normal(patches, vit["width"]), normal(vit["width"],
                                                      vit["mlp_dim"])
  v_heads = vit["num_heads"]
  v_q = normal(batch, image_tokens, v_heads, vit["width"] // v_heads)
  v_k = normal(batch, image_tokens, vit["width"] // v_heads)
  square, lora_a = normal(width, width), normal(width, 4)
  return [
      ("decoder GeGLU MLP, forward + input gradient",
       lambda x, *w: jax.grad(lambda x: jnp.sum(geglu(x, *w)))(x),
       (x, *mlp_weights), 12 * tokens * width * mlp, dec["depth"]),
      ("decoder q/k/v/o, forward + input gradient (as width x width)",
       lambda x, w: x @ w @ w.T, (x, square),
       4 * tokens * width * width, dec["depth"] * projections / width),
      ("decoder attention scores, forward + backward",
       lambda q, k: jax.grad(lambda q, k: jnp.sum(attention(q, k) ** 2),
                             (0, 1))(q, k), (q, k), 3 * att_flops,
       dec["depth"]),
      ("ViT MLP, forward",
       lambda x, w: jax.nn.gelu(x @ w) @ w.T, (v_x, v_wide),
       4 * patches * vit["width"] * vit["mlp_dim"], vit["depth"]),
      ("ViT q/k/v/o, forward (as width x width)",
       lambda x, w: x @ w, (v_x, normal(vit["width"], vit["width"])),
       2 * patches * vit["width"] ** 2, 4 * vit["depth"]),
      ("ViT attention scores, forward",
       attention, (v_q, v_k),
       4 * batch * image_tokens ** 2 * vit["width"], vit["depth"]),
      ("LoRA rank 4 (as on width x width), forward + gradients",
       lambda x, a: jax.grad(lambda x, a: jnp.sum((x @ a) @ a.T), (0, 1))(
           x, a), (x, lora_a), 3 * 4 * tokens * width * 4,
       7 * dec["depth"]),
  ]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="cpu", choices=sorted(peer.SHAPES))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--text_len", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  report, total_s, total_flops = {}, 0.0, 0.0
  for name, fn, fn_args, flop, calls in products(
      peer.SHAPES[args.shape], args.batch, args.text_len):
    s = seconds(fn, *fn_args, repeats=args.repeats)
    total_s, total_flops = total_s + s * calls, total_flops + flop * calls
    report[name] = dict(ms=s * 1e3, gflop_per_s=flop / s / 1e9, calls=calls)
    print(f"{name:62s} {s * 1e3:8.2f} ms x {calls:5.1f}  "
          f"{flop / s / 1e9:6.1f} GFLOP/s", flush=True)
  report["sum"] = dict(ms=total_s * 1e3,
                       gflop_per_s=total_flops / total_s / 1e9,
                       gflop=total_flops / 1e9)
  print(f"sum of the step's products: {total_s * 1e3:.0f} ms for "
        f"{total_flops / 1e9:.1f} GFLOP ({total_flops / total_s / 1e9:.0f} "
        "GFLOP/s)")
  return report


if __name__ == "__main__":
  main()
