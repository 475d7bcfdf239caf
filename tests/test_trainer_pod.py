"""What a pod run needs from the loop: a profiler window, throughput and MFU."""
import glob
import json

import pytest

from omnismola import flops
from omnismola.train import logging as log_lib
from omnismola.train import trainer
from test_trainer import tiny_config


def test_profile_window_writes_a_trace_and_the_log_has_throughput(
    synthetic_data_dir, tmp_path):
  config = tiny_config(synthetic_data_dir, steps=3)
  config.profile.update(dict(first_step=2, steps=1))
  trainer.train_and_evaluate(config, str(tmp_path))

  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" /
                         "*.xplane.pb"))
  assert len(traces) == 1  # One window, one host.
  with open(tmp_path / "train_metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  tokens, row_flops = trainer.row_cost(config)
  assert tokens == 16 + 48 + 32  # 64 px / patch 16 squared + prefix + suffix.
  assert row_flops > 0
  for r in records[1:]:  # The first step's rate is not measured (compile).
    # The trainer passes 8 rows of 96 tokens a step, one example each, and
    # the model's FLOPs over 8 devices (the rates' formulas: the test above).
    assert r["tokens_per_sec"] / r["steps_per_sec"] == pytest.approx(8 * 96)
    assert r["examples_per_sec"] / r["steps_per_sec"] == pytest.approx(8)
    assert r["tflops_per_device"] * 1e12 / r["steps_per_sec"] == (
        pytest.approx(row_flops))
    # CPU: no known peak (no MFU) and no allocator statistics.
    assert "mfu" not in r and "peak_memory_gib" not in r


def _fake_clock(*times):
  return iter(times).__next__


def test_rates_follow_the_clock_and_mfu_needs_a_known_peak():
  """4 rows of 100 tokens and 1e12 FLOPs a step, 2 devices: 6 steps in 3 s
  are 2 steps/s, 8 examples/s, 800 tokens/s, 4 TFLOP/s per device."""
  progress = log_lib.Progress(0, 10, 4, tokens_per_row=100,
                              flops_per_row=1e12, num_devices=2,
                              peak_flops=flops.peak_flops("NVIDIA H100"),
                              clock=_fake_clock(10.0, 13.0, 14.0, 16.0))
  progress.start(1)
  assert progress.update(7) == pytest.approx(dict(
      steps_per_sec=2.0, examples_per_sec=8.0, tokens_per_sec=800.0,
      tflops_per_device=4.0, mfu=4e12 / 989e12))
  # Packed rows: 10 examples a step; 1 step in 1 s. ETA: 2 steps left at the
  # mean rate since start, 7 steps in 6 s.
  assert progress.update(8, examples_per_step=10)["examples_per_sec"] == 10.0
  assert progress.eta_seconds(8) == pytest.approx(2 / (7 / 6))
  unknown = log_lib.Progress(0, 10, 4, tokens_per_row=100,
                             flops_per_row=1e12, num_devices=2,
                             peak_flops=None, clock=_fake_clock(0.0, 0.5))
  unknown.start(0)
  assert unknown.update(1) == pytest.approx(dict(
      steps_per_sec=2.0, examples_per_sec=8.0, tokens_per_sec=800.0,
      tflops_per_device=4.0))


def test_time_inside_pause_counts_neither_in_rates_nor_in_the_eta():
  """An evaluation of 100 s between steps 2 and 4: 2 steps in 2 s of
  training are 1 step/s, and 6 steps left take 6 s."""
  progress = log_lib.Progress(0, 10, 4, tokens_per_row=100,
                              flops_per_row=1e12, num_devices=1,
                              peak_flops=None,
                              clock=_fake_clock(0.0, 1.0, 101.0, 102.0,
                                                102.0))
  progress.start(2)                 # t = 0
  with progress.pause():            # t = 1 .. 101
    pass
  assert progress.update(4)["steps_per_sec"] == 1.0   # t = 102
  assert progress.eta_seconds(4) == 6.0              # t = 102
