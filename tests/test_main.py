"""The command line: clear errors for misspelt config keys and bad configs."""
import os
import subprocess
import sys

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
