r"""Entry point: python -m omnismola.main --config=configs/mix.py --workdir=DIR.

Modes:
  train    trains (resuming from DIR/checkpoints when present), then evaluates;
  eval     evaluates the latest checkpoint of DIR on config.eval.split (or,
           when DIR has none, config.init.checkpoint's parameters: zero-shot);
  predict  answers --prompt about --image with that model and prints the
           answer, or every line of --predict_file into --predict_output;
  analyze  plots the expert usage of that model per task and modality into
           DIR/analysis (usage.json and PNGs; omnismola/analyze.py).
Any config field can be overridden, e.g. --config.train.steps=50.

Multi-host: every host runs the same command; outside Cloud TPU, SLURM and
Open MPI, pass --coordinator_address, --num_processes and --process_id.
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
from omnismola import errors
from omnismola import schema
from omnismola import storage

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally FILE:ARG.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, metrics and evals.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "predict", "analyze"], "What to run.")
_IMAGE = flags.DEFINE_string("image", None, "--mode=predict: an image file.")
_PROMPT = flags.DEFINE_string("prompt", None,
                              "--mode=predict: the prompt, e.g. 'caption en'.")
_PREDICT_FILE = flags.DEFINE_string(
    "predict_file", None, "--mode=predict: a JSON-lines file of "
    '{"image": ..., "prompt": ...} lines to answer (docs/training.md).')
_PREDICT_OUTPUT = flags.DEFINE_string(
    "predict_output", None, "--mode=predict --predict_file: where to write "
    "the answers (default: <workdir>/predictions/<file name>).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "HOST:PORT of process 0, for multi-host runs outside Cloud TPU "
    "(default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", os.environ.get("JAX_NUM_PROCESSES"),
    "Processes of a multi-host run (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", os.environ.get("JAX_PROCESS_ID"),
    "This process's index in [0, num_processes) (default: $JAX_PROCESS_ID).")
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


def initialize_distributed(coordinator_address: str | None,
                           num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins the processes of a multi-host run; must precede any JAX use.
  A coordinator address needs the other two values; without one, JAX
  detects Cloud TPU, SLURM and Open MPI jobs, else runs one process."""
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and "
                           "--process_id (or JAX_NUM_PROCESSES and "
                           "JAX_PROCESS_ID).")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  if num_processes is not None or process_id is not None:
    raise app.UsageError("--num_processes/--process_id need "
                         "--coordinator_address (or JAX_COORDINATOR_ADDRESS).")
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if "coordinator_address" not in str(e):
      raise  # A cluster was detected but is misconfigured.
    logging.info("No multi-host cluster detected: running one process.")


def main(argv):
  del argv
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  # People read the progress lines and the eval table; library info logs
  # (Orbax, TFDS) only with an explicit --verbosity.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from omnismola.train import guards  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  logging.info("Config:\n%s", config)
  try:
    schema.check(config)
    # Before anything is written: the workdir's bucket (for a URL) exists
    # and TensorFlow can read the data dir (omnismola/storage.py).
    storage.check_bucket(_WORKDIR.value)
    storage.tensorflow_location(config.data.tfds_data_dir)
    run_mode(_MODE.value, config, _WORKDIR.value)
  except (guards.NonFiniteError, errors.InputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run_mode(mode: str, config, workdir: str) -> None:
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  if mode == "train":
    trainer.train_and_evaluate(config, workdir)
  elif mode == "eval":
    trainer.evaluate_checkpoint(config, workdir)
  elif mode == "analyze":
    from omnismola import analyze  # pylint: disable=g-import-not-at-top
    for path in analyze.analyze(config, workdir):
      print(f"Wrote {path}")
  elif _PREDICT_FILE.value:
    from omnismola import predict  # pylint: disable=g-import-not-at-top
    path = predict.predict_file(config, workdir, _PREDICT_FILE.value,
                                _PREDICT_OUTPUT.value)
    print(f"Wrote {path}")
  elif _IMAGE.value and _PROMPT.value:
    from omnismola import predict  # pylint: disable=g-import-not-at-top
    print(predict.predict(config, workdir, _IMAGE.value, _PROMPT.value))
  else:
    raise app.UsageError("--mode=predict needs --image and --prompt, or "
                         "--predict_file.")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
