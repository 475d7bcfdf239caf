r"""Where a train step's time goes: XLA's per-op times, by kind of work.

Traces `--steps` steps of the trainer's jitted step (as benchmarks/step.py
builds it) with jax.profiler, reads the trace back (jax.profiler.
ProfileData) and sums every executed op's time into a category decided by
what the compiled op computes (its fused computation's HLO):

  matmul      dot products (XLA's ynn/oneDNN fusions and plain dots)
  attention   softmax and masking of the attention scores, where XLA keeps
              them apart (on CPU it fuses the exp into the scores' matmul
              fusion, counted as matmul)
  loss        the logits' softmax cross-entropy (log of a sum of exps)
  norm        RMS/LayerNorm (rsqrt)
  activation  GELU/GeGLU (tanh or erf)
  scan        the layer scan's bookkeeping: each layer's slice of the
              stacked weights and saved activations (forward and backward)
              and their stacked buffers' writes and zero-initialisation
  layout      other copies, transposes, slices, concatenations, pads,
              broadcasts: data moved, nothing computed
  optimizer   AdamW's update (sqrt of the second moment, outside the scan)
  other       everything else (reductions, casts, small elementwise ops)

Prints the time per step of each category and its share of the total op
time (summed over XLA's threads), and the ten slowest ops with their share.

  python -m benchmarks.profile --shape=cpu --experts=lora --frozen_backbone
  python -m benchmarks.profile --shape=small --experts=smola --text_len=80

Shapes are benchmarks/peer.py's (`cpu`, `tiny`) or a model preset.
"""
import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax

from benchmarks import peer
from benchmarks import step as step_bench
from omnismola import build

CATEGORIES = ("matmul", "attention", "loss", "norm", "activation", "scan",
              "layout", "optimizer", "other")
# Where jax's scan slices a layer's inputs and writes its stacked outputs.
SCAN_OPS = re.compile(r"dynamic_(update_)?index_in_dim")
# Profiler events that contain other events or are not work.
CONTAINERS = re.compile(r"^(ThunkExecutor|SlinkyThreadPool|ThreadpoolListener"
                        r"|end: |while|conditional|call)")
LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "slice",
              "dynamic-slice", "dynamic-update-slice", "concatenate", "pad",
              "broadcast", "parameter", "constant", "tuple",
              "get-tuple-element", "iota", "select", "compare", "convert"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{$")


def parse_hlo(text: str) -> tuple[dict[str, list[str]], dict[str, tuple]]:
  """({computation: its opcodes}, {instruction: (opcode, called computation
  or None, the line)}) of an HLO module's text."""
  computations, instructions, current = {}, {}, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      computations[current] = []
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, opcode = match.groups()
      computations[current].append(opcode)
      called = _CALLS.search(line)
      instructions[name] = (opcode, called.group(1) if called else None, line)
  return computations, instructions


def categorize(name: str, computations, instructions) -> str:
  """The category of the executed op `name` (see the module docstring)."""
  opcode, called, line = instructions.get(name, (None, None, ""))
  if name.startswith("ynn_fusion") or opcode in ("dot", "convolution"):
    return "matmul"
  ops = set(computations.get(called, [])) if called else {opcode}
  if {"dot", "convolution"} & ops:
    return "matmul"
  if "rsqrt" in ops:
    return "norm"
  if "sqrt" in ops and "/while/" not in line:
    return "optimizer"
  if "exponential" in ops and "log" in ops:
    return "loss"
  if "exponential" in ops:
    return "attention"
  if {"tanh", "erf"} & ops:
    return "activation"
  # Computing nothing of the above: the scan's slicing and stacking.
  if SCAN_OPS.search(line) or (
      opcode == "fusion" and ops <= {"broadcast", "parameter", "constant"}
      and "/while/body/closed_call" in line):
    return "scan"
  if ops and ops <= LAYOUT_OPS:
    return "layout"
  return "other"


def op_times(trace_dir: str) -> dict[str, float]:
  """{op name: seconds} summed over XLA's threads in the trace."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                          recursive=True))[-1]
  data = jax.profiler.ProfileData.from_file(path)
  times = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if not CONTAINERS.match(event.name):
          times[event.name] += event.duration_ns / 1e9
  return dict(times)


def profile(args) -> dict:
  """Traces the step; returns {category: seconds per step}, the slowest ops
  and the wall time per step."""
  shape = (build.shape_fields(args.shape, peer.SHAPES[args.shape])
           if args.shape in peer.SHAPES else
           step_bench.model_fields(args.shape))
  options = argparse.Namespace(experts=args.experts, pools=args.pools,
                               rank=args.rank, dtype=args.dtype,
                               frozen_backbone=args.frozen_backbone,
                               unrolled_layers=args.unrolled_layers)
  config = step_bench.experiment_config(options, shape)
  state, train_step, put_batch = step_bench.trainer_step(config)
  batch = put_batch(step_bench.synthetic_batch(shape, args.batch,
                                               args.text_len))
  compiled = jax.jit(train_step, donate_argnums=0).lower(state,
                                                         batch).compile()
  computations, instructions = parse_hlo(compiled.as_text())
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    wall = (time.perf_counter() - start) / args.steps
    jax.profiler.stop_trace()
    times = op_times(trace_dir)
  by_category = collections.Counter()
  for name, seconds in times.items():
    by_category[categorize(name, computations, instructions)] += seconds
  slowest = sorted(times.items(), key=lambda kv: -kv[1])[:10]
  per_step = lambda s: s / args.steps
  return {"wall_s": wall,
          "categories": {c: per_step(by_category[c]) for c in CATEGORIES},
          "slowest": [(name, categorize(name, computations, instructions),
                       per_step(s)) for name, s in slowest]}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="cpu",
                      help="benchmarks/peer.py's cpu or tiny, or a preset")
  parser.add_argument("--experts", default="lora",
                      choices=("none", "lora", "smola"))
  parser.add_argument("--pools", type=int, default=4)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--frozen_backbone", action="store_true",
                      help="train the adapters only")
  parser.add_argument("--unrolled_layers", action="store_true",
                      help="model.scan_layers=False: layers unrolled.")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--text_len", type=int, default=32)
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = profile(args)
  total = sum(result["categories"].values())
  print(step_bench.machine_line())
  trained = "adapters" if args.frozen_backbone else "all"
  print(f"# shape={args.shape} experts={args.experts} trained={trained} "
        f"batch={args.batch} "
        f"text_len={args.text_len} dtype={args.dtype}: "
        f"{result['wall_s'] * 1e3:.0f} ms a step (wall), "
        f"{total * 1e3:.0f} ms of op time over XLA's threads")
  print(f"{'category':<12}{'ms/step':>10}{'share':>8}")
  for category, seconds in result["categories"].items():
    print(f"{category:<12}{seconds * 1e3:>10.1f}{seconds / total:>8.1%}")
  print("slowest ops:")
  for name, category, seconds in result["slowest"]:
    print(f"  {name:<40}{category:<12}{seconds * 1e3:>8.1f} ms "
          f"{seconds / total:>6.1%}")
  return result


if __name__ == "__main__":
  main()
