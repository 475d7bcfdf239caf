"""The command line: clear errors for misspelt config keys and bad configs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "omnismola.main", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


def test_misspelt_override_fails_at_once_naming_the_key(tmp_path):
  result = _run("--config=configs/mix.py", f"--workdir={tmp_path}",
                "--config.train.stpes=5")
  assert result.returncode == 2
  assert "'stpes'" in result.stderr and "config.train" in result.stderr
  assert "steps" in result.stderr  # The valid fields are listed.
  assert "Traceback" not in result.stderr
  assert not os.listdir(tmp_path)  # Nothing was started.


def test_misspelt_top_level_key(tmp_path):
  result = _run("--config=configs/mix.py", f"--workdir={tmp_path}",
                "--config.trian.steps=5")
  assert result.returncode == 2
  assert "'trian'" in result.stderr and "train" in result.stderr


def test_missing_config_file(tmp_path):
  result = _run("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert "configs/nope.py" in result.stderr


TINY = ["--config.model.vit.width=32", "--config.model.vit.depth=1",
        "--config.model.vit.mlp_dim=64", "--config.model.vit.num_heads=2",
        "--config.model.decoder.width=32", "--config.model.decoder.depth=1",
        "--config.model.decoder.mlp_dim=64",
        "--config.model.decoder.num_heads=2",
        "--config.model.decoder.head_dim=16", "--config.train.batch_size=8",
        "--config.train.log_every=1", "--config.data.shuffle_buffer=64"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synthetic_data_dir,
                                                      tmp_path):
  """Preemption: SIGTERM mid-run -> checkpoint of the current step, exit 0."""
  import json  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.Popen(
      [sys.executable, "-m", "omnismola.main",
       "--config=configs/mix.py:experts_per_pool=1,rank=1",
       f"--workdir={workdir}", "--config.train.steps=100000",
       "--config.train.checkpoint_every=100000",
       f"--config.data.tfds_data_dir={synthetic_data_dir}", *TINY],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  metrics = workdir / "train_metrics.jsonl"
  deadline = time.time() + 180
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, "training did not start"
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert "Stopped by SIGTERM" in output
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints")
                 if d.isdigit())
  logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
  assert steps and steps[-1] >= logged[-1] >= 2


def test_model_experts_train_and_eval_import_without_tensorflow():
  """Accelerator images lack TensorFlow/SeqIO: only data/ may need them."""
  code = ("import sys; import omnismola.train.trainer, omnismola.build, "
          "omnismola.eval.evaluator, omnismola.eval.metrics; "
          "print([m for m in ('tensorflow', 'seqio', 'tensorflow_datasets', "
          "'pycocoevalcap') if m in sys.modules])")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def test_multihost_flags_need_a_coordinator(tmp_path):
  result = _run("--config=configs/mix.py", f"--workdir={tmp_path}",
                "--num_processes=2", "--process_id=0")
  assert result.returncode != 0
  assert "--coordinator_address" in result.stderr
  assert not os.listdir(tmp_path)
