"""The benchmark scripts keep running (tiny shapes; numbers not checked)."""
import json
import os
import subprocess
import sys

import pytest

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


def test_peer_benchmark_times_both_sides_at_the_same_shape(capsys):
  """benchmarks/peer.py on its tiny shape: every side timed, the ratio is
  of the printed rates, and the model FLOPs are the shape's."""
  from benchmarks import peer  # pylint: disable=g-import-not-at-top
  report = peer.main(["--shape=tiny", "--batch=2", "--text_len=8",
                      "--rounds=2", "--steps=1", "--warmup=1",
                      "--unrolled_layers"])
  out = capsys.readouterr().out
  assert set(report) == {"matmul_gflop_per_s", "omnismola_lora",
                         "omnismola_smola", "omnismola_lora_unrolled",
                         "hf_peft_lora", "lora_over_peer",
                         "unrolled_over_peer"}
  # Unrolled, JAX drops work a scanned loop must keep for every layer
  # (input gradients that the frozen layers below do not need).
  flop = lambda side: report[side]["gflop_per_s"] * report[side]["step_s"]
  assert 0.9 * flop("omnismola_lora") < flop("omnismola_lora_unrolled") < (
      flop("omnismola_lora"))
  for side in ("omnismola_lora", "omnismola_smola", "omnismola_lora_unrolled",
               "hf_peft_lora"):
    line = report[side]
    assert line["min_step_s"] <= line["step_s"] <= line["max_step_s"]
    assert line["examples_per_s"] * line["step_s"] == pytest.approx(2)
    assert f"{side} step_s=" in out
  assert report["lora_over_peer"] == (
      report["omnismola_lora"]["examples_per_s"] /
      report["hf_peft_lora"]["examples_per_s"])
  # SMoLA's 12 experts cost more FLOPs per step than one LoRA.
  assert flop("omnismola_smola") > flop("omnismola_lora")
  assert report["matmul_gflop_per_s"] > 0


def test_peer_lora_targets_the_language_model_only():
  """PEFT's regex hits the decoder's seven linears of every layer and none
  of the vision tower's (whose q/k/v share the names)."""
  import re  # pylint: disable=g-import-not-at-top
  from benchmarks import peer  # pylint: disable=g-import-not-at-top
  names = ["model.language_model.layers.0.self_attn.q_proj",
           "model.language_model.layers.3.mlp.down_proj",
           "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
           "model.multi_modal_projector.linear"]
  hits = [n for n in names if re.fullmatch(peer.HF_TARGETS, n)]
  assert hits == names[:2]


@pytest.mark.slow
def test_gpu_script_runs_on_tiny_shapes(tmp_path):
  """benchmarks/gpu.sh with TINY=1: both of its commands run and write
  their outputs (on a GPU it runs them at PaliGemma-3B-224)."""
  env = dict(os.environ, TINY="1", JAX_PLATFORMS="cpu",
             PYTHON=sys.executable)
  result = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  peer_out = (tmp_path / "peer.txt").read_text()
  assert "omnismola_lora_over_hf_peft_examples_per_s=" in peer_out
  suite_out = (tmp_path / "step_suite.txt").read_text()
  assert "smola_over_lora_step_s=" in suite_out


def _pages(root, readme: str, page: str):
  (root / "docs").mkdir()
  (root / "README.md").write_text(readme)
  (root / "docs" / "performance.md").write_text(page)


def test_figures_reads_the_commands_the_pages_show(tmp_path):
  """benchmarks/figures.py measures what the docs show: README's main
  command, then every `bash` block command of the page in order (joined
  continuations, comments dropped, each once), no accelerator command."""
  from benchmarks import figures  # pylint: disable=g-import-not-at-top
  _pages(tmp_path,
         "```bash\npython3 -m venv .venv && pip install -e . && "
         "python -m omnismola.main --config=configs/mix.py --workdir=/tmp/a\n"
         "```\n",
         "text\n```bash\npython -m benchmarks.step --preset=small \\\n"
         "    --steps=10   # the default\n# a comment\n\n"
         "bash benchmarks/gpu.sh OUT\n"
         "python -m benchmarks.step --suite=paligemma_3b_224 --batch=8\n"
         "```\n```python\nprint('not a command')\n```\n"
         "```bash\nX=1 python benchmarks/smola.py --experts=4\n"
         "python -m benchmarks.step --preset=small --steps=10\n```\n")
  assert figures.documented_commands(tmp_path) == [
      "python -m omnismola.main --config=configs/mix.py --workdir=/tmp/a",
      "python -m benchmarks.step --preset=small --steps=10",
      "X=1 python benchmarks/smola.py --experts=4"]
  assert [figures.program(c) for c in figures.documented_commands(tmp_path)
          ] == ["omnismola.main", "benchmarks.step", "smola.py"]


def test_figures_runs_each_command_in_a_fresh_workdir_and_goes_on_after_a_failure(
    tmp_path, monkeypatch, capsys):
  from benchmarks import figures  # pylint: disable=g-import-not-at-top
  root = tmp_path / "repo"
  root.mkdir()
  show_argv = "import sys; print(sys.argv[1:])"
  _pages(root,
         f'```bash\npython -m omnismola.main -c "{show_argv}" '
         "--workdir=/tmp/somewhere_else\n```\n",
         '```bash\npython -c "raise SystemExit(3)"\n'
         'python -c "print(2 + 2)"\n```\n')
  # The README's pattern: `python -m omnismola.main ...` stands for a
  # program; here `python -m` gets a module that echoes its arguments.
  (root / "omnismola").mkdir()
  (root / "omnismola" / "main.py").write_text(show_argv + "\n")
  monkeypatch.setattr(figures, "ROOT", root)
  out = tmp_path / "out"
  assert figures.main([f"--out={out}"]) == 1
  logs = sorted(p.name for p in out.glob("*.log"))
  assert logs == ["01_omnismola.main.log", "02_python.log", "03_python.log"]
  first = (out / "01_omnismola.main.log").read_text()
  assert f"--workdir={out / 'runs' / '01'}" in first
  assert "/tmp/somewhere_else" not in first.split("\n", 1)[1]
  assert "# exit status 0" in first
  assert "# exit status 3" in (out / "02_python.log").read_text()
  assert "4\n" in (out / "03_python.log").read_text()
  rows = [l for l in (out / "summary.md").read_text().splitlines()
          if l.startswith("| 0")]
  assert [r.rsplit("|", 2)[1].strip() for r in rows] == ["0", "3", "0"]
  assert "1 command(s) failed" in capsys.readouterr().out


def test_products_benchmark_counts_the_peer_steps_products():
  """benchmarks/products.py on the tiny shape: every product timed, and the
  sum's FLOPs are the products' FLOPs times their calls."""
  from benchmarks import products  # pylint: disable=g-import-not-at-top
  report = products.main(["--shape=tiny", "--batch=2", "--text_len=8",
                          "--repeats=1"])
  parts = [v for k, v in report.items() if k != "sum"]
  assert len(parts) == 7 and all(p["ms"] > 0 for p in parts)
  flop = sum(p["gflop_per_s"] * p["ms"] * 1e-3 * p["calls"] for p in parts)
  assert abs(flop - report["sum"]["gflop"]) < 1e-6 * report["sum"]["gflop"]
  assert abs(report["sum"]["ms"] -
             sum(p["ms"] * p["calls"] for p in parts)) < 1e-6
