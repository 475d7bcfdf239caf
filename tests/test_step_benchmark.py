"""benchmarks/step.py runs on the tiny preset and never imports TensorFlow.

The three settings run in-process (one JAX start-up, well under a minute);
whether TensorFlow is imported is checked in a fresh process, since other
tests of the session import it.
"""
import os
import subprocess
import sys

import pytest

from benchmarks import step

FIELDS = ("step_s", "examples_per_s", "tokens_per_s", "tflop_per_s", "mfu",
          "compiled_mem_mb", "peak_mem_mb")


@pytest.mark.parametrize("experts,unrolled", [("none", False),
                                              ("lora", False),
                                              ("smola", False),
                                              ("lora", True)])
def test_tiny_step_benchmark(experts, unrolled, capsys):
  step.main(["--preset=tiny", f"--experts={experts}", "--pools=2",
             "--rank=2", "--batch=2", "--text_len=8", "--steps=2",
             "--warmup=1", "--frozen_backbone"] +
            (["--unrolled_layers"] if unrolled else []))
  machine, line = capsys.readouterr().out.strip().splitlines()
  assert machine.startswith("# machine: ") and "jax=" in machine
  fields = dict(kv.split("=", 1) for kv in line.split())
  assert set(FIELDS) <= set(fields)
  # tiny: 16 px in 8 px patches, 4 image tokens, then 8 text tokens; the
  # rates are of 2 such rows a step.
  assert fields["tokens"] == "12"
  seconds = float(fields["step_s"])
  assert float(fields["examples_per_s"]) * seconds == pytest.approx(2, rel=0.05)
  assert float(fields["tokens_per_s"]) * seconds == pytest.approx(24, rel=0.05)
  assert float(fields["compiled_mem_mb"]) >= 0
  assert fields["experts"] == experts
  assert fields["scan_layers"] == str(not unrolled)
  assert fields["trained"] == ("all" if experts == "none" else "adapters")
  assert fields["mfu"] == "n/a"  # CPU without --peak_tflops.


def test_benchmark_path_imports_no_tensorflow():
  code = ("import sys; from benchmarks import step; "
          "step.main(['--preset=tiny', '--experts=none', '--batch=2', "
          "'--text_len=8', '--steps=1', '--warmup=1']); "
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow', 'seqio', 'tensorflow_datasets'}))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root,
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
