"""benchmarks/step.py runs on the tiny preset and never imports TensorFlow.

In-process (one JAX start-up for all three settings, to stay well under a
minute), so sys.modules shows what the benchmark path imported.
"""
import sys

import pytest

from benchmarks import step

FIELDS = ("step_s", "examples_per_s", "tokens_per_s", "tflop_per_s", "mfu",
          "compiled_mem_mb", "peak_mem_mb")


@pytest.mark.parametrize("experts", ["none", "lora", "smola"])
def test_tiny_step_benchmark(experts, capsys):
  step.main(["--preset=tiny", f"--experts={experts}", "--pools=2",
             "--rank=2", "--batch=2", "--text_len=8", "--steps=2",
             "--warmup=1", "--frozen_backbone"])
  machine, line = capsys.readouterr().out.strip().splitlines()
  assert machine.startswith("# machine: ") and "jax=" in machine
  fields = dict(kv.split("=", 1) for kv in line.split())
  assert set(FIELDS) <= set(fields)
  assert float(fields["step_s"]) > 0 and float(fields["tokens_per_s"]) > 0
  assert fields["experts"] == experts
  assert fields["trained"] == ("all" if experts == "none" else "adapters")
  assert fields["mfu"] == "n/a"  # CPU without --peak_tflops.
  assert not any(m.split(".")[0] in ("tensorflow", "seqio")
                 for m in sys.modules)
