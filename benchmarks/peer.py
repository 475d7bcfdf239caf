r"""omnismola's train step against transformers' PaliGemma + PEFT LoRA.

Both sides train the same model at the same shape and do the same work: a
frozen PaliGemma-style backbone (SigLIP-style ViT, linear projector, Gemma
decoder with one key/value head), LoRA rank 4 on every linear of the
language model (q, k, v, o, gate, up, down; none in the vision tower),
AdamW, random weights, one random batch: images, then text of which the
first half is the prefix (bidirectional) and the second the suffix (causal,
the loss). omnismola also runs SMoLA (3 pools x 4 experts, rank 4) on the
same linears, reported beside LoRA.

The sides alternate in one process: each round runs `--steps` timed steps
of every side, and this machine's float32 matmul rate ([3072, 256] x
[256, 1024] with jnp.dot) is measured between rounds, so that load on a
shared machine falls on all of them alike. Prints one key=value line per
side (median step time over all rounds, examples/s, and the model's
GFLOP/s with its share of the matmul rate), then the ratio of examples/s.

  python -m benchmarks.peer                      # the CPU shape below
  python -m benchmarks.peer --shape=paligemma_3b_224 --dtype=bfloat16 \
      --batch=8 --text_len=64                    # on a GPU

transformers, peft and torch are optional (`pip install -e .[peer]`); where
they are missing the torch side is skipped and said so. On a GPU the torch
side runs on CUDA when torch sees one.
"""
import argparse
import datetime
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import step as step_bench
from omnismola import build
from omnismola import flops

# Width 256, 4 ViT and 4 decoder layers, 64x64 images in 8x8 patches (64
# image tokens), vocabulary 512, multi-query attention: a model a 2-core
# CPU trains at a few steps a second.
CPU_SHAPE = dict(
    vit=dict(image_size=64, patch_size=8, width=256, depth=4, num_heads=4,
             mlp_dim=1024),
    decoder=dict(vocab_size=512, width=256, depth=4, num_heads=4,
                 num_kv_heads=1, head_dim=64, mlp_dim=1024),
    connector="linear")
# The smallest shape with every part: the test's.
TINY_SHAPE = dict(
    vit=dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=2,
             mlp_dim=64),
    decoder=dict(vocab_size=64, width=32, depth=1, num_heads=2,
                 num_kv_heads=1, head_dim=16, mlp_dim=64),
    connector="linear")
SHAPES = {"cpu": CPU_SHAPE, "tiny": TINY_SHAPE,
          "paligemma_3b_224": step_bench.PALIGEMMA_3B_224}
RANK, SMOLA_EXPERTS = 4, 4
# The language model's linears in transformers' PaliGemma.
HF_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|"
              r"up_proj|down_proj)")
MATMUL = (3072, 256, 1024)


def omnismola_step(model: dict, experts: str, batch: int, text_len: int,
                   dtype: str, unrolled_layers: bool = False):
  """run() -> loss of one donated train step of omnismola's trainer, and
  its model FLOPs per example (counted in its traced program, flops.py).
  `unrolled_layers`: model.scan_layers=False."""
  args = argparse.Namespace(experts=experts, pools=SMOLA_EXPERTS, rank=RANK,
                            frozen_backbone=True, dtype=dtype,
                            unrolled_layers=unrolled_layers)
  config = step_bench.experiment_config(args, model)
  state, train_step, put_batch = step_bench.trainer_step(config)
  batch_arrays = put_batch(step_bench.synthetic_batch(model, batch, text_len))
  compiled = jax.jit(train_step, donate_argnums=0).lower(
      state, batch_arrays).compile()
  holder = [state]

  def run() -> float:
    holder[0], metrics = compiled(holder[0], batch_arrays)
    return float(metrics["loss"])  # Waits for the step.

  return run, flops.count(train_step, state, batch_arrays).required / batch


def hf_peft_step(shape: dict, batch: int, text_len: int, dtype: str,
                 device: str):
  """run() -> loss of one step of transformers' PaliGemma + PEFT LoRA.

  Random weights (nothing downloaded), the shape of `shape`; the batch laid
  out as omnismola's: image tokens, a bidirectional prefix (token type 0),
  the suffix (token type 1) that carries the loss.
  """
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vit, dec = shape["vit"], shape["decoder"]
  image_token = dec["vocab_size"] - 1
  config = transformers.PaliGemmaConfig(
      vision_config=dict(
          image_size=vit["image_size"], patch_size=vit["patch_size"],
          hidden_size=vit["width"], num_hidden_layers=vit["depth"],
          num_attention_heads=vit["num_heads"],
          intermediate_size=vit["mlp_dim"], projection_dim=dec["width"],
          vision_use_head=False),
      text_config=dict(
          model_type="gemma", vocab_size=dec["vocab_size"],
          hidden_size=dec["width"], num_hidden_layers=dec["depth"],
          num_attention_heads=dec["num_heads"],
          num_key_value_heads=dec["num_kv_heads"], head_dim=dec["head_dim"],
          intermediate_size=dec["mlp_dim"]),
      image_token_index=image_token, projection_dim=dec["width"])
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  torch.manual_seed(0)
  model = transformers.PaliGemmaForConditionalGeneration(config).to(
      device, torch_dtype)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=RANK, lora_alpha=RANK, target_modules=HF_TARGETS))
  model.train()
  optimizer = torch.optim.AdamW(
      [p for p in model.parameters() if p.requires_grad], lr=1e-3,
      weight_decay=1e-4)
  n = (vit["image_size"] // vit["patch_size"])**2
  length = n + text_len
  ids = torch.randint(2, image_token, (batch, length), device=device)
  ids[:, :n] = image_token
  token_type = torch.zeros_like(ids)
  token_type[:, n + text_len // 2:] = 1
  labels = torch.where(token_type == 1, ids, -100)
  pixels = (torch.rand(batch, 3, vit["image_size"], vit["image_size"],
                       device=device) * 2 - 1).to(torch_dtype)

  def run() -> float:
    loss = model(input_ids=ids, pixel_values=pixels,
                 token_type_ids=token_type, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())  # Waits for the step (CUDA included).

  versions = (f"torch={torch.__version__} "
              f"transformers={transformers.__version__} "
              f"peft={peft.__version__}")
  return run, versions


def torch_skip_reason() -> str | None:
  missing = [m for m in ("torch", "transformers", "peft")
             if importlib.util.find_spec(m) is None]
  return f"{', '.join(missing)} not importable" if missing else None


def torch_device() -> str:
  import torch  # pylint: disable=g-import-not-at-top
  return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_rate(dtype: str, repeats: int = 5) -> float:
  """FLOP/s of jnp.dot on MATMUL's shapes (median of `repeats`)."""
  m, k, n = MATMUL
  a = jnp.ones((m, k), dtype)
  b = jnp.ones((k, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * m * k * n / statistics.median(times)


def time_once(run) -> float:
  start = time.perf_counter()
  loss = run()
  seconds = time.perf_counter() - start
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss}")
  return seconds


def measure(sides: dict, rounds: int, steps: int, warmup: int, dtype: str
            ) -> tuple[dict[str, list[float]], list[float]]:
  """({side: step seconds}, matmul FLOP/s per round), alternating."""
  for run in sides.values():
    for _ in range(warmup):
      time_once(run)
  seconds = {name: [] for name in sides}
  rates = []
  for _ in range(rounds):
    rates.append(matmul_rate(dtype))
    for name, run in sides.items():
      seconds[name] += [time_once(run) for _ in range(steps)]
  return seconds, rates


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--text_len", type=int, default=32,
                      help="text tokens: half prefix, half suffix")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3,
                      help="timed steps of each side per round")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no_smola", action="store_true",
                      help="omnismola's LoRA side only")
  parser.add_argument("--unrolled_layers", action="store_true",
                      help="also time omnismola's LoRA step with its layers "
                      "unrolled (model.scan_layers=False), alternated with "
                      "the others")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  shape = SHAPES[args.shape]
  model = build.shape_fields(args.shape, shape)
  common = (args.batch, args.text_len, args.dtype)
  sides, model_flops = {}, {}
  sides["omnismola_lora"], model_flops["omnismola_lora"] = omnismola_step(
      model, "lora", *common)
  if not args.no_smola:
    sides["omnismola_smola"], model_flops["omnismola_smola"] = (
        omnismola_step(model, "smola", *common))
  if args.unrolled_layers:
    sides["omnismola_lora_unrolled"], model_flops["omnismola_lora_unrolled"] = (
        omnismola_step(model, "lora", *common, unrolled_layers=True))
  versions = ""
  reason = torch_skip_reason()
  if reason is None:
    device = torch_device()
    sides["hf_peft_lora"], versions = hf_peft_step(shape, *common, device)
  print(step_bench.machine_line() + (f" {versions}" if versions else ""))
  print(f"# shape={args.shape} batch={args.batch} text_len={args.text_len} "
        f"dtype={args.dtype} rounds={args.rounds} steps={args.steps} "
        f"date={datetime.date.today().isoformat()}")
  seconds, rates = measure(sides, args.rounds, args.steps, args.warmup,
                           args.dtype)
  rate = statistics.median(rates)
  print(f"matmul_gflop_per_s={rate / 1e9:.1f} "
        f"(min {min(rates) / 1e9:.1f}, max {max(rates) / 1e9:.1f}; "
        f"jnp.dot {MATMUL[0]}x{MATMUL[1]} @ {MATMUL[1]}x{MATMUL[2]})")
  report = {"matmul_gflop_per_s": rate / 1e9}
  for name, times in seconds.items():
    step_s = statistics.median(times)
    line = {"step_s": step_s, "examples_per_s": args.batch / step_s,
            "min_step_s": min(times), "max_step_s": max(times)}
    # omnismola's model FLOPs (flops.py); the peer's are its LoRA step's.
    flop = model_flops.get(name, model_flops["omnismola_lora"])
    line["gflop_per_s"] = flop * args.batch / step_s / 1e9
    line["matmul_rate_share"] = line["gflop_per_s"] * 1e9 / rate
    report[name] = line
    print(f"{name} " + " ".join(
        f"{k}={v:.4g}" for k, v in line.items()))
  if "hf_peft_lora" in report:
    report["lora_over_peer"] = (report["omnismola_lora"]["examples_per_s"] /
                                report["hf_peft_lora"]["examples_per_s"])
    print(f"omnismola_lora_over_hf_peft_examples_per_s="
          f"{report['lora_over_peer']:.2f}")
    if "omnismola_lora_unrolled" in report:
      report["unrolled_over_peer"] = (
          report["omnismola_lora_unrolled"]["examples_per_s"] /
          report["hf_peft_lora"]["examples_per_s"])
      print(f"omnismola_lora_unrolled_over_hf_peft_examples_per_s="
            f"{report['unrolled_over_peer']:.2f}")
  else:
    print(f"# hf_peft_lora: skipped ({reason})")
  return report


if __name__ == "__main__":
  main()
