"""Test set-up: 8 fake CPU devices for sharding tests, set before JAX loads;
one persistent compilation cache for the session."""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
  """XLA's persistent compilation cache, shared by the session's workers and
  the processes tests start (they inherit the environment): tests compile
  the same programs again and again (the `tiny` train step, a subprocess
  repeating what its test compiled in-process), and a hit loads the
  executable XLA built for the identical program earlier in the session.
  Empty at the start of every session (nothing carries over between runs);
  removed at its end. A directory set from outside is used as it is."""
  if _CACHE_ENV in os.environ:  # Set from outside, or by the controller.
    return
  cache = tempfile.mkdtemp(prefix="omnismola_tests_jax_cache_")
  os.environ[_CACHE_ENV] = cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  config.stash[_cache_key] = cache


def pytest_unconfigure(config):
  cache = config.stash.get(_cache_key, None)
  if cache is not None:
    shutil.rmtree(cache, ignore_errors=True)


_cache_key = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """The synthetic suite built small (64 train / 16 validation per task)."""
  from omnismola.data.synthetic import builder  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from omnismola.data.synthetic import scenes  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds")
  sizes = dict(builder.SPLIT_SIZES)
  builder.SPLIT_SIZES.update(train=64, validation=16)
  try:
    for task in scenes.TASKS:
      tfds.builder(f"omnismola_synthetic/{task}",
                   data_dir=str(data_dir)).download_and_prepare()
  finally:
    builder.SPLIT_SIZES.update(sizes)
  return data_dir
