"""The benchmark scripts keep running (tiny shapes; numbers not checked)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smola_benchmark_runs_and_reports_both_forms():
  result = subprocess.run(
      [sys.executable, "benchmarks/smola.py", "--experts=4", "--rank=2",
       "--width=32", "--tokens=64", "--bidirectional=0.5", "--repeats=1"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["fused"]["seconds"] > 0 and report["naive"]["seconds"] > 0
  assert report["config"]["experts"] == 4
  # The two forms compute the same (slot and per-token paths both used).
  assert report["max_abs_difference"] < 1e-5
