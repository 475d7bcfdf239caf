"""What a pod run needs from the loop: a profiler window, throughput and MFU."""
import glob
import json

import pytest

from omnismola.train import flops
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
  for r in records[1:]:  # The first step's rate is not measured (compile).
    assert r["tokens_per_sec"] == pytest.approx(r["steps_per_sec"] * 8 *
                                                tokens)
    # Model TFLOP/s per device from the FLOP count and the step rate.
    assert r["tflops_per_device"] == pytest.approx(
        row_flops * 8 * r["steps_per_sec"] / 8 / 1e12)
    # CPU: no known peak (no MFU) and no allocator statistics.
    assert "mfu" not in r and "peak_memory_gib" not in r


def test_mfu_is_logged_against_a_known_peak_only():
  progress = log_lib.Progress(0, 10, 4, tokens_per_row=100,
                              flops_per_row=1e12, num_devices=2,
                              peak_flops=flops.peak_flops("NVIDIA H100"))
  progress.start(0)
  scalars = progress.update(1)
  assert scalars["mfu"] == pytest.approx(
      scalars["tflops_per_device"] * 1e12 / 989e12)
  unknown = log_lib.Progress(0, 10, 4, tokens_per_row=100,
                             flops_per_row=None, num_devices=2,
                             peak_flops=None)
  unknown.start(0)
  assert set(unknown.update(1)) == {"steps_per_sec", "examples_per_sec",
                                    "tokens_per_sec"}


def test_a_model_without_a_flop_count_is_logged_without_mfu(monkeypatch,
                                                            capsys):
  def uncounted(*args, **kwargs):
    raise ValueError("No FLOP count for expert kind 'new_kind'")

  monkeypatch.setattr(flops, "train_flops", uncounted)
  tokens, row_flops = trainer.row_cost(tiny_config())
  assert (tokens, row_flops) == (16 + 48 + 32, None)
  assert "new_kind" in capsys.readouterr().out


def test_profile_window_fields_are_checked():
  with pytest.raises(ValueError, match="config.profile.first_step must be"):
    trainer.profiler.StepTrace(0, 1, "/tmp/unused")
  with pytest.raises(ValueError, match="config.profile.steps must be"):
    trainer.profiler.StepTrace(1, -1, "/tmp/unused")
