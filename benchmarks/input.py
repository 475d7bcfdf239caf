r"""Input throughput: examples/s of a config's train iterator on one core.

Pins this process to one CPU core and caps tf.data at one thread
(`private_threadpool_size=1`, `max_intra_op_parallelism=1`), builds the
config's data if missing (`pipeline.prepare`), then times the train
iterator, as the trainer uses it, over `--batches` batches after `--warmup`
batches (the first ones wait for the shuffle buffers to fill). Prints the
machine and date, then one `key=value` line: examples/s, wall and CPU
seconds (CPU seconds above wall seconds would mean more than one core was
used), and how much of
each row is real rather than padding (text positions, and the decoder's
whole image + text sequence), the number packing raises. `--packing=M`
packs up to M examples per row (config.data.packing, docs/data.md).

  python -m benchmarks.input --config=configs/mix.py --batches=200
  python -m benchmarks.input --config=configs/mix.py --batches=200 --packing=2

Compare `examples_per_s` with the train step's examples/s
(`benchmarks/step.py`): the input keeps up when it is higher.
"""
import argparse
import datetime
import os
import platform
import time

import numpy as np

from benchmarks.step import cpu_name
from omnismola import config_lib
from omnismola import row_layout
from omnismola.train import loss


def pin_to_one_core() -> int:
  """Restricts this process (and every thread it starts later) to one core.

  Must run before TensorFlow starts its thread pools.
  """
  core = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {core})
  return core


_LAYOUT_KEYS = ("mask_input", "segment_ids", "task_id")


def measure(config, *, batches: int, warmup: int, threads: int) -> dict:
  """Examples/s and padding of the train iterator after `warmup` batches.

  With packing (config.data.packing), rows hold several examples: the
  fills are over each row's image slots and text, examples are counted.
  """
  from omnismola.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.prepare(config.data)
  batch_size = int(config.train.batch_size)
  layout = row_layout.row_layout(config.data)
  iterator = pipeline.make_train_iterator(
      config.data, global_batch_size=batch_size, seed=config.seed,
      threads=threads)
  for _ in range(warmup):
    next(iterator)
  read = []  # Each batch's text layout (not its images), counted after.
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(iterator)
    read.append({k: batch[k] for k in _LAYOUT_KEYS if k in batch})
  seconds = time.perf_counter() - start
  # All threads' CPU time: at most `seconds` when pinned to one core.
  cpu_seconds = time.process_time() - start_cpu
  vit = config.model.vit
  image_tokens = (vit.image_size // vit.patch_size) ** 2
  real_text = np.mean([b["mask_input"].sum(axis=1) for b in read])
  # Counted as the training log counts them.
  examples = sum(int(loss.count_examples(b)) for b in read)
  examples_per_row = examples / (batches * batch_size)
  return dict(
      examples_per_s=examples / seconds, seconds=seconds,
      cpu_seconds=cpu_seconds, examples=examples,
      examples_per_row=examples_per_row,
      text_fill=real_text / layout.text_length,
      sequence_fill=(image_tokens * examples_per_row + real_text) /
      (image_tokens * layout.images + layout.text_length))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/mix.py",
                      help="a config file (and :arg), as for omnismola.main")
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--threads", type=int, default=1,
                      help="tf.data threads (the process is on one core)")
  parser.add_argument("--tfds_data_dir", default=None,
                      help="overrides config.data.tfds_data_dir")
  parser.add_argument("--packing", type=int, default=None,
                      help="overrides config.data.packing.examples")
  parser.add_argument("--packing_text_length", type=int, default=None,
                      help="overrides config.data.packing.text_length")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  core = pin_to_one_core()
  config = config_lib.load_config_file(args.config)
  if args.tfds_data_dir:
    config.data.tfds_data_dir = args.tfds_data_dir
  if args.packing is not None:
    config.data.packing.examples = args.packing
  if args.packing_text_length is not None:
    config.data.packing.text_length = args.packing_text_length
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  print(f"# machine: host={cpu_name()!r} pinned to core {core}, tf.data "
        f"threads={args.threads} tf={tf.__version__} "
        f"python={platform.python_version()} "
        f"load average={os.getloadavg()[0]:.1f} "
        f"date={datetime.date.today().isoformat()}", flush=True)
  result = measure(config, batches=args.batches, warmup=args.warmup,
                   threads=args.threads)
  print(f"config={args.config} mixture={config.data.mixture} "
        f"batch={config.train.batch_size} "
        f"packing={dict(config.data.packing)} " +
        " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()), flush=True)


if __name__ == "__main__":
  main()
