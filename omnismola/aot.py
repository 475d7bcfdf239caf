r"""Ahead-of-time check: lower and compile a config's train step, no weights.

  python -m omnismola.aot --config=configs/mix.py [--config.mesh.fsdp=8 ...]

The train state's and batch's shapes (`jax.eval_shape`; row_layout.py) are
all it builds; the trainer's own jitted step is lowered and compiled on
`config.mesh`, and XLA's per-device memory and the compile time are
printed, so a config that does not fit, shard or compile is found before a
pod is booked. The memory is what XLA reserves on the platform it compiles
for, an estimate of an accelerator's; the replication check
(`config.train.max_replicated_fraction`) runs as in training. On 8
emulated CPU devices: docs/performance.md.
"""
import dataclasses
import time

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

from omnismola.models import layers
from omnismola.train import partitioning
from omnismola.train import trainer

@dataclasses.dataclass(frozen=True)
class Report:
  """What compiling one train step showed; memory per device, in bytes."""
  mesh: dict
  batch_size: int
  text_len: int
  images_per_row: int  # Above 1: packed rows (config.data.packing).
  replicated_fraction: float
  state_bytes: int
  state_shard_bytes: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  lower_seconds: float
  compile_seconds: float

  def __str__(self) -> str:
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    # Donated (aliased) outputs are counted once.
    total = (self.argument_bytes + self.output_bytes + self.temp_bytes -
             self.alias_bytes)
    return "\n".join([
        f"mesh {self.mesh}, batch {self.batch_size} rows x "
        f"{self.images_per_row} image(s) + {self.text_len} text "
        f"tokens; {self.replicated_fraction:.1%} of the parameter bytes "
        "whole on every device",
        f"train state (parameters, optimizer): {gib(self.state_bytes)}, "
        f"{gib(self.state_shard_bytes)} per device",
        f"per device: arguments {gib(self.argument_bytes)}, outputs "
        f"{gib(self.output_bytes)}, temporaries {gib(self.temp_bytes)}, "
        f"donated (aliased) {gib(self.alias_bytes)}, total "
        f"{gib(total)}",
        f"lowering {self.lower_seconds:.1f} s, compiling "
        f"{self.compile_seconds:.1f} s"])


def _nbytes(tree, per_device: bool) -> int:
  """Bytes of abstract arrays (with shardings), whole or on one device."""
  shape = lambda x: x.sharding.shard_shape(x.shape) if per_device else x.shape
  return sum(int(np.prod(shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def compile_train_step(config):
  """(compiled step, Report) of `config`'s train step on `config.mesh`."""
  built = trainer.setup(config)
  mesh, abstract = built.mesh, built.abstract
  replicated = trainer.check_replication(config, built)
  # Per-task loss sums are [num_tasks] floats: one task changes nothing
  # measurable and keeps the mixture (TensorFlow) out of this check.
  step = trainer.jit_train_step(config, built.parts, built.optimizer,
                                abstract, num_tasks=1)
  batch = trainer.abstract_batch(config, mesh)
  with layers.activation_sharding(
      partitioning.activation_sharding(mesh, built.rules)):
    start = time.perf_counter()
    lowered = step.lower(abstract, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
  memory = compiled.memory_analysis()
  return compiled, Report(
      mesh=dict(mesh.shape), batch_size=int(config.train.batch_size),
      text_len=batch["text"].shape[1],
      images_per_row=(batch["image"].shape[1] if "segment_ids" in batch
                      else 1),
      replicated_fraction=replicated,
      state_bytes=_nbytes(abstract, per_device=False),
      state_shard_bytes=_nbytes(abstract, per_device=True),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      lower_seconds=lowered_at - start, compile_seconds=compiled_at - lowered_at)


def report_config(config) -> None:
  """Compiles `config`'s train step and prints what it needs."""
  print(f"model {config.model.get('preset', '?')}, "
        f"{len(config.experts)} expert entries, trainable "
        f"{config.train.trainable!r}, compute {config.train.compute_dtype}, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices")
  _, report = compile_train_step(config)
  print(report)


if __name__ == "__main__":
  # Defined here, not at import: the trainer's tests import this module
  # beside omnismola.main, which defines the same --config flag.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally FILE:ARG.", lock_config=True)
  app.run(lambda argv: report_config(_CONFIG.value))
