"""Test set-up: 8 fake CPU devices for sharding tests, set before JAX loads."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top


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
