r"""Training step speed, MFU and memory on synthetic batches (issue 7, item 4).

Runs the trainer's own jitted step (`trainer.make_train_step`, state donated
as in training) on random batches: no data pipeline, so neither TensorFlow nor
SeqIO is imported and the numbers are the model's alone. Prints one
`key=value` line per configuration: median step time after warm-up,
examples/s, tokens/s (image + text), model TFLOP/s and MFU from the
step's own traced program (`omnismola/flops.py`), and memory (XLA's compiled estimate; on GPU also the
allocator's peak).

  python -m benchmarks.step --preset=small --experts=smola --pools=4 \
      --rank=4 --batch=32 --text_len=80 --steps=10 --dtype=float32

`--suite=paligemma_3b_224` runs issue 7's three configurations on the
PaliGemma-3B-224 shape, each in its own process so each has the device to
itself (and its own peak memory): (a) full fine-tuning, (b) frozen backbone
+ LoRA rank 4 on every decoder linear, (c) frozen backbone + SMoLA 3 pools ×
16 experts rank 4 on every decoder linear; then, when transformers and peft
import and CUDA is there, transformers' PaliGemma + PEFT LoRA of the same
shape and batch, reported as a tokens/s ratio against (b).

`--suite=smola_vs_lora` runs (b) and (c) alone on `--preset` (e.g. `tiny`),
each in a fresh process, and prints SMoLA's step time over LoRA's:

  python -m benchmarks.step --suite=smola_vs_lora --preset=tiny --batch=32 \
      --text_len=80 --steps=10

MFU is against the device's bf16 dense peak (`flops.PEAK_FLOPS`) or
`--peak_tflops`; on CPU it is n/a unless that flag is given.

`benchmarks/smola.py`'s `measure` is not used: it calls the step repeatedly
on the same arguments, which rules out donating the state, and without
donation full fine-tuning of the 3B shape does not fit in 80 GB.
"""
import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omnismola import build
from omnismola import flops
from omnismola import schema
from omnismola.train import host_shards
from omnismola.train import optim
from omnismola.train import trainer

DECODER_LINEARS = r"decoder/layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"

# PaliGemma-3B at 224 px: SigLIP So400m/14 and Gemma-2B (257,216 tokens:
# Gemma's 256,000 plus 1,024 location and 128 segmentation tokens).
PALIGEMMA_3B_224 = dict(
    vit=dict(image_size=224, patch_size=14, width=1152, depth=27,
             num_heads=16, mlp_dim=4304),
    decoder=dict(vocab_size=257_216, width=2048, depth=18, num_heads=8,
                 num_kv_heads=1, head_dim=256, mlp_dim=16_384),
    connector="linear")

# Issue 7's configurations: (name, experts, pools, rank, frozen backbone).
SUITE = (("full", "none", 0, 0, False),
         ("lora", "lora", 0, 4, True),
         ("smola", "smola", 16, 4, True))
# Each suite's preset (None: --preset) and configurations, by SUITE name.
SUITES = {"paligemma_3b_224": ("paligemma_3b_224", ("full", "lora", "smola")),
          "smola_vs_lora": (None, ("lora", "smola"))}


def model_fields(preset: str) -> dict:
  if preset == "paligemma_3b_224":
    return build.shape_fields(preset, PALIGEMMA_3B_224)
  return build.model_config_to_dict(preset)


def expert_entries(kind: str, pools: int, rank: int) -> list[dict]:
  """`config.experts` for one kind on every decoder linear."""
  if kind == "none":
    return []
  if kind == "lora":
    return [dict(kind="lora", targets=DECODER_LINEARS, rank=rank)]
  return [dict(kind="smola", targets=DECODER_LINEARS, rank=rank,
               pools=dict(text=pools, image=pools, all=pools))]


def experiment_config(args, model: dict) -> ml_collections.ConfigDict:
  """The trainer config of one benchmark run of `model` (model_fields) with
  args' experts (optimizer as configs/mix.py)."""
  frozen = args.frozen_backbone and args.experts != "none"
  config = schema.base_config()
  config.model = dict(model, scan_layers=not args.unrolled_layers)
  config.experts = expert_entries(args.experts, args.pools, args.rank)
  config.train.trainable = r".*/adapters/.*" if frozen else r".*"
  config.train.compute_dtype = args.dtype
  schema.check(config)
  return config


def trainer_step(config):
  """(state, step, put_batch) from the trainer: its one use in this file.

  Kept to this function so a change of the trainer's API is one edit here.
  """
  built = trainer.setup(config)
  step = trainer.make_train_step(
      built.parts, built.optimizer,
      optim.learning_rate_schedule(config.train), num_tasks=1,
      compute_dtype=jnp.dtype(config.train.compute_dtype))
  put_batch = host_shards.make_put_batch(built.mesh, built.rules)
  return built.init_fn(jax.random.key(config.seed)), step, put_batch


def synthetic_batch(model: dict, batch: int, text_len: int) -> dict:
  """Random images and tokens: half prefix, half suffix, all targets."""
  rng = np.random.default_rng(0)
  size = model["vit"]["image_size"]
  suffix = (np.arange(text_len) >= text_len // 2).astype(np.int32)
  ones = np.ones((batch, text_len), np.int32)
  return dict(
      image=rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
      text=rng.integers(2, model["decoder"]["vocab_size"],
                        (batch, text_len)).astype(np.int32),
      mask_ar=ones * suffix, mask_input=ones, mask_loss=ones * suffix,
      task_id=np.zeros((batch,), np.int32))


def time_steps(step, state, batch, steps: int, warmup: int):
  """(median seconds of `steps` steps after `warmup`, compiled step)."""
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times), compiled


def compiled_bytes(compiled) -> int | None:
  """XLA's estimate of the step's device memory: inputs, outputs, temps."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes +
          m.temp_size_in_bytes - m.alias_size_in_bytes)


def allocator_peak_bytes() -> int | None:
  """The device allocator's peak (GPU/TPU); CPU has no such statistic."""
  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def cpu_name() -> str:
  """The host CPU's model name (Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f
               if line.startswith("model name")]
  except OSError:
    names = []
  return f"{names[0]} x{len(names)}" if names else platform.machine()


def machine_line() -> str:
  device = jax.devices()[0]
  return (f"# machine: device={device.device_kind!r} x{jax.device_count()} "
          f"platform={device.platform} host={cpu_name()!r} "
          f"jax={jax.__version__} python={platform.python_version()} "
          f"date={datetime.date.today().isoformat()}")


def mb(value) -> str:
  return "n/a" if value is None else f"{value / 2**20:.0f}"


def benchmark(args) -> str:
  """Runs one configuration; returns its result line."""
  model = model_fields(args.preset)
  config = experiment_config(args, model)
  state, step, put_batch = trainer_step(config)
  batch = put_batch(synthetic_batch(model, args.batch, args.text_len))
  # The model FLOPs of the very program timed (flops.py), per example.
  example_flops = flops.count(step, state, batch).required / args.batch
  tokens = build.vlm_config(model).num_image_tokens + args.text_len
  seconds, compiled = time_steps(step, state, batch, args.steps, args.warmup)
  step_flops = example_flops * args.batch
  peak = (args.peak_tflops * 1e12 if args.peak_tflops else
          flops.peak_flops(jax.devices()[0].device_kind))
  mfu = ("n/a" if peak is None or jax.devices()[0].platform == "cpu"
         and not args.peak_tflops else
         f"{flops.mfu(step_flops, seconds, jax.device_count(), peak):.3f}")
  trained = "adapters" if config.train.trainable != ".*" else "all"
  return (f"preset={args.preset} experts={args.experts} pools={args.pools} "
          f"rank={args.rank} trained={trained} dtype={args.dtype} "
          f"scan_layers={not args.unrolled_layers} batch={args.batch} "
          f"text_len={args.text_len} tokens={tokens} "
          f"step_s={seconds:.4f} examples_per_s={args.batch / seconds:.1f} "
          f"tokens_per_s={args.batch * tokens / seconds:.0f} "
          f"gflop_per_example={example_flops / 1e9:.4g} "
          f"tflop_per_s={step_flops / seconds / 1e12:.3f} mfu={mfu} "
          f"compiled_mem_mb={mb(compiled_bytes(compiled))} "
          f"peak_mem_mb={mb(allocator_peak_bytes())}")


def hf_peft_line(args) -> str:
  """transformers' PaliGemma-3B-224 shape + PEFT LoRA rank 4 on CUDA, timed
  as `benchmark` times ours (benchmarks/peer.py builds it)."""
  from benchmarks import peer  # pylint: disable=g-import-not-at-top
  run, versions = peer.hf_peft_step(PALIGEMMA_3B_224, args.batch,
                                    args.text_len, args.dtype, "cuda")
  times = [peer.time_once(run) for _ in range(args.warmup + args.steps)]
  seconds = statistics.median(times[args.warmup:])
  length = (PALIGEMMA_3B_224["vit"]["image_size"] //
            PALIGEMMA_3B_224["vit"]["patch_size"])**2 + args.text_len
  return (f"hf_peft_lora batch={args.batch} text_len={args.text_len} "
          f"step_s={seconds:.4f} tokens_per_s={args.batch * length / seconds:.0f}"
          f" {versions}")


def hf_skip_reason() -> str | None:
  """Why the transformers + PEFT comparison cannot run here, if it cannot."""
  from benchmarks import peer  # pylint: disable=g-import-not-at-top
  reason = peer.torch_skip_reason()
  if reason is None and peer.torch_device() != "cuda":
    reason = "no CUDA device"
  return reason


def field(line: str, key: str) -> float:
  return float(dict(kv.split("=", 1) for kv in line.split()
                    if "=" in kv)[key])


def run_child(argv: list[str]) -> str | None:
  """Runs this script with `argv`; echoes its output, returns its last line."""
  result = subprocess.run([sys.executable, "-m", "benchmarks.step", *argv],
                          capture_output=True, text=True, check=False)
  print(result.stdout, end="", flush=True)
  if result.returncode:
    print(f"# failed ({argv}): {result.stderr.strip().splitlines()[-1:]}",
          flush=True)
    return None
  return result.stdout.strip().splitlines()[-1]


def suite(args) -> None:
  """A suite's configurations, each in a fresh process, their step time
  ratio, then (PaliGemma suite) HF + PEFT."""
  preset, names = SUITES[args.suite]
  common = [f"--preset={preset or args.preset}", f"--batch={args.batch}",
            f"--text_len={args.text_len}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--dtype={args.dtype}"]
  if args.unrolled_layers:
    common.append("--unrolled_layers")
  if args.peak_tflops:
    common.append(f"--peak_tflops={args.peak_tflops}")
  lines = {}
  for name, kind, pools, rank, frozen in SUITE:
    if name not in names:
      continue
    lines[name] = run_child(
        common + [f"--experts={kind}", f"--pools={pools}", f"--rank={rank}"] +
        (["--frozen_backbone"] if frozen else []))
  if lines["lora"] and lines["smola"]:
    ratio = field(lines["smola"], "step_s") / field(lines["lora"], "step_s")
    print(f"smola_over_lora_step_s={ratio:.2f}")
  if args.suite != "paligemma_3b_224":
    return
  reason = hf_skip_reason()
  if reason is None:
    hf = run_child(common + ["--hf_peft"])
    if hf and lines["lora"]:
      ratio = (field(lines["lora"], "tokens_per_s") /
               field(hf, "tokens_per_s"))
      print(f"omnismola_lora_over_hf_peft_tokens_per_s={ratio:.2f}")
  else:
    print(f"# hf_peft_lora: skipped ({reason})")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small",
                      help="a model preset, or paligemma_3b_224")
  parser.add_argument("--experts", default="none",
                      choices=("none", "lora", "smola"))
  parser.add_argument("--pools", type=int, default=4,
                      help="SMoLA experts in each of the text/image/all pools")
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--frozen_backbone", action="store_true",
                      help="train the adapters only")
  parser.add_argument("--unrolled_layers", action="store_true",
                      help="model.scan_layers=False: layers unrolled.")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--text_len", type=int, default=80)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="peak TFLOP/s per device for MFU (default: known "
                      "device table; n/a on CPU)")
  parser.add_argument("--suite", default=None, choices=sorted(SUITES))
  parser.add_argument("--hf_peft", action="store_true",
                      help=argparse.SUPPRESS)  # The suite's child process.
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.suite:
    print(f"# suite {args.suite}: jax={jax.__version__} "
          f"date={datetime.date.today().isoformat()}", flush=True)
    suite(args)
  elif args.hf_peft:
    print(hf_peft_line(args))
  else:
    print(machine_line())
    print(benchmark(args), flush=True)


if __name__ == "__main__":
  main()
