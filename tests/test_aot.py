"""PaliGemma-3B-224 + Omni-SMoLA compiles on 8 CPU devices with fsdp=8."""
from omnismola import aot
from omnismola import config_lib


def test_paligemma_smola_train_step_compiles_sharded():
  """The documented `python -m omnismola.aot` command (docs/performance.md),
  with no weights allocated."""
  config = config_lib.load_config_file(
      "configs/mix.py:preset=paligemma_3b_224,frozen_backbone=True")
  config.mesh.update(dict(data=1, fsdp=8))
  config.train.compute_dtype = "bfloat16"
  _, report = aot.compile_train_step(config)
  assert report.mesh == dict(data=1, fsdp=8, tensor=1, expert=1)
  # fsdp=8 shards almost every byte; what stays whole are the parameters
  # whose only shardable axis maps to `tensor` (size 1 here).
  assert report.replicated_fraction < 0.05
  # So no device holds the 3B backbone whole: a device's state is an eighth
  # of the sharded bytes plus the replicated adapters with their Adam
  # moments (1.95 of 11.6 GiB when measured), and the step's inputs are
  # that shard plus the batch's.
  assert report.state_shard_bytes < report.state_bytes / 4
  assert report.argument_bytes >= report.state_shard_bytes
  # The state is donated: the new state reuses its buffers.
  assert report.alias_bytes >= report.state_shard_bytes * 0.99
  assert report.temp_bytes > 0
