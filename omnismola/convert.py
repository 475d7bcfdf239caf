r"""Converts a pretrained checkpoint into an omnismola checkpoint directory.

  python -m omnismola.convert --from=hf_paligemma --input=DIR --output=OUT
  python -m omnismola.convert --from=big_vision --input=FILE.npz --output=OUT

OUT is laid out like a training workdir holding one checkpoint (step 0):
the parameters, and a config whose `model` fields describe the backbone. So
it serves both as `--config.init.checkpoint=OUT` (a partial restore: new
experts and routers initialise) and as `omnismola.from_pretrained(OUT)`.
Arrays keep the source dtype (bfloat16 stays bfloat16).
"""
import sys

from absl import app
from absl import flags

from omnismola import build
from omnismola import storage
from omnismola.train import checkpoint as checkpoint_lib
from omnismola.train import logging as log_lib

FORMATS = ("hf_paligemma", "big_vision")

flags.DEFINE_enum("from", None, FORMATS, "Format of --input.")
flags.DEFINE_string("input", None, "Checkpoint directory (hf_paligemma) or "
                    ".npz file (big_vision).")
flags.DEFINE_string("output", None, "Directory to write.")


def load(source_format: str, path: str):
  """(model config fields, params) of a checkpoint in `source_format`."""
  if source_format == "hf_paligemma":
    from omnismola.models.convert import hf_paligemma
    return hf_paligemma.load(path)
  if source_format == "big_vision":
    from omnismola.models.convert import big_vision
    return big_vision.load_npz(path)
  raise ValueError(f"Unknown format {source_format!r}; formats: {FORMATS}.")


def convert(source_format: str, path: str, output: str) -> str:
  """Writes `output`/checkpoints/0 (either may be a storage URL); returns
  `output`."""
  storage.check_bucket(output)  # Before the long read of the input.
  fields, params = load(source_format, path)
  checkpoints = storage.path(output) / "checkpoints"
  if checkpoints.exists() and any(checkpoints.iterdir()):
    raise FileExistsError(f"{checkpoints} exists and is not empty; choose "
                          "another --output.")
  # Every field spelled out (and validated) by a round trip through
  # VLMConfig, so the saved config reads like any config.model.
  model = build.shape_fields(f"{source_format}:{storage.path(path)}", fields)
  writer = checkpoint_lib.Checkpointer(checkpoints, keep=1, async_save=False)
  writer.save(0, {"params": params}, {}, dict(model=model, experts=[]))
  writer.close()
  return output


def main(argv):
  del argv
  values = flags.FLAGS
  missing = [n for n in ("from", "input", "output") if not values[n].value]
  if missing:
    sys.exit(f"Missing flags: {', '.join('--' + n for n in missing)}.")
  try:
    out = convert(values["from"].value, values.input, values.output)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"Conversion failed: {e}")
  log_lib.print_line(f"Wrote {out}. Use it as --config.init.checkpoint={out} "
                     f"or omnismola.from_pretrained({out!r}).")


if __name__ == "__main__":
  app.run(main)
