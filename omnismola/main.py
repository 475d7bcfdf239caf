r"""Entry point: python -m omnismola.main --config=configs/mix.py --workdir=DIR.

Modes:
  train  trains (resuming from DIR/checkpoints when present), then evaluates;
  eval   evaluates the latest checkpoint of DIR.
Any config field can be overridden, e.g. --config.train.steps=50.
"""
import os
import sys

# Before anything can import TensorFlow: its C++ info logs are noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from omnismola import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally FILE:ARG.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, metrics and evals.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl flag parsing, with a readable error for unknown config keys."""
  config_arg = next((a.split("=", 1)[1] for a in argv[1:]
                     if a.startswith(("--config=", "-config="))), None)
  if config_arg is not None:
    try:
      config_lib.check_override_keys(config_lib.load_config_file(config_arg),
                                     argv[1:])
    except (config_lib.ConfigKeyError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --help for the flags.", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  # People read the progress lines and the eval table; library info logs
  # (Orbax, TFDS) only with an explicit --verbosity.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  logging.info("Config:\n%s", config)
  if _MODE.value == "train":
    trainer.train_and_evaluate(config, _WORKDIR.value)
  else:
    trainer.evaluate_checkpoint(config, _WORKDIR.value)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
