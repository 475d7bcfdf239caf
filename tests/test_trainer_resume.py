"""Exact resume: a run killed by SIGKILL and restarted logs the same losses.

Run as a script (`python tests/test_trainer_resume.py WORKDIR DATA_DIR STEPS`)
this file is the training process the test starts and kills. The schedule is
constant, so a run's length does not change its steps: the leg that is killed
is made too long to end by itself.
"""
import json
import os
import signal
import subprocess
import sys
import time

STEPS, CHECKPOINT_EVERY = 30, 5
# Killed after this step at the earliest: between two checkpoints, so the
# restart repeats the steps logged after the last one. The kill comes a
# step or two later (a tiny step takes ~0.05 s, a checkpointing one ~0.5 s):
# far from STEPS.
KILL_AFTER = 2 * CHECKPOINT_EVERY + 2


def _start(workdir, data_dir, steps=STEPS) -> subprocess.Popen:
  """The training process; its output goes to a file (`process.log`), not a
  pipe, which a long run would fill and block on while the test polls."""
  workdir.mkdir(parents=True, exist_ok=True)
  log = open(f"{workdir}.log", "w")  # pylint: disable=consider-using-with
  process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(workdir), str(data_dir),
       str(steps)],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stdout=log, stderr=subprocess.STDOUT, text=True)
  process.log = f"{workdir}.log"
  return process


def _output(process: subprocess.Popen) -> str:
  with open(process.log) as f:
    return f.read()


def _finish(process: subprocess.Popen) -> str:
  process.wait(timeout=900)
  assert process.returncode == 0, _output(process)
  return _output(process)


def _has_checkpoint(workdir) -> bool:
  """A finished checkpoint (Orbax renames a step's temporary directory to
  the bare step number when it is complete; old steps get deleted)."""
  directory = workdir / "checkpoints"
  return directory.exists() and any(d.isdigit() for d in os.listdir(directory))


def _logged(workdir) -> list[str]:
  path = workdir / "train_metrics.jsonl"
  return path.read_text().splitlines() if path.exists() else []


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, _logged(workdir))}


def test_sigkill_then_restart_logs_bitwise_identical_losses(
    synthetic_data_dir, tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  _finish(_start(straight, synthetic_data_dir))

  process = _start(killed, synthetic_data_dir, steps=100 * STEPS)
  deadline = time.time() + 900  # Generous: a loaded CI machine is slow.
  while len(_logged(killed)) < KILL_AFTER or not _has_checkpoint(killed):
    assert process.poll() is None, _output(process)
    assert time.time() < deadline, "training did not progress"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert len(_logged(killed)) < STEPS, f"killed too late (aimed at {KILL_AFTER})"

  output = _finish(_start(killed, synthetic_data_dir))
  assert "Resuming from the checkpoint of step" in output
  assert _losses(killed) == _losses(straight)  # Exact float equality.
  assert sorted(_losses(killed)) == list(range(1, STEPS + 1))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  from test_trainer import tiny_config  # pylint: disable=g-import-not-at-top
  trainer.train_and_evaluate(
      tiny_config(sys.argv[2], steps=int(sys.argv[3]),
                  checkpoint_every=CHECKPOINT_EVERY),
      sys.argv[1])
